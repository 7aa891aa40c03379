"""The API's parameter types: annotations BentoML turns into the OpenAPI schema (/docs.json).

Limits are documented in the schema (json_schema_extra) and enforced by service.request_validation,
whose 4xx messages say what to fix.

NB: no `from __future__ import annotations` here or in service/service.py: BentoML infers the
API schemas from the real annotations.
"""

import typing
from pathlib import Path

from pydantic import Field

from service.settings import LIMITS, MAX_LOCATION_CHARS

# `Path = None`, not Optional[Path]: BentoML 1.4.40 cannot build a schema for Optional[Path]
# ("unhashable type: FileSchema"), and a PIL.Image parameter would be decoded by BentoML
# before our checks (a non-image upload would then be a 500).
OptionalImage = typing.Annotated[
    Path,
    Field(description="A photo of the listing (JPEG, PNG, WEBP, GIF, BMP or TIFF) as a multipart file part; "
                      f"at most {LIMITS.max_image_bytes:,} bytes and {LIMITS.max_image_pixels:,} pixels."),
]
OptionalText = typing.Annotated[
    typing.Optional[str],
    Field(description="Listing text (name, description); photo and/or text is required. "
                      "Multipart text fields are JSON-encoded strings.",
          json_schema_extra={"maxLength": LIMITS.max_text_chars}),
]
OptionalTown = typing.Annotated[
    typing.Optional[str],
    Field(description="The listing's town for the price estimate, as in a listing's location "
                      "('Leeds' of 'Leeds, West Yorkshire'); a town the price model never saw counts as none.",
          json_schema_extra={"maxLength": MAX_LOCATION_CHARS}),
]
OptionalCounty = typing.Annotated[
    typing.Optional[str],
    Field(description="The listing's county for the price estimate ('West Yorkshire' of 'Leeds, West Yorkshire').",
          json_schema_extra={"maxLength": MAX_LOCATION_CHARS}),
]
SearchK = typing.Annotated[
    int,
    Field(description=f"Number of results, 1 to {LIMITS.max_k}.",
          json_schema_extra={"minimum": 1, "maximum": LIMITS.max_k}),
]
SearchCategory = typing.Annotated[
    typing.Optional[str],
    Field(description="Only return listings of this category (case-insensitive; see /metadata 'categories')."),
]
ProductId = typing.Annotated[
    typing.Optional[str],
    Field(description="The product_id of a listing in the index (as returned by /search).",
          json_schema_extra={"maxLength": 100}),
]
JSONDict = typing.Dict[str, typing.Any]
