"""Work-around for BentoML's multipart parsing: a client's mistake answered with a 4xx, not a 500.

Written for **BentoML 1.4.40** (`_bentoml_impl.serde.MultipartSerde`); `WRITTEN_FOR` below.
Four requests reach BentoML's catch-all and come back as a 500 there:

* a non-file value of a file parameter (``-F image=http://...``) is treated as a URL and fetched
  by the server (a 500 for anything that is not a reachable URL, and a request-forgery surface):
  here a photo must be uploaded as a file part -> 400;
* a malformed multipart body (Starlette's HTTPException(400) / MultiPartException) -> 400;
* a text field over Starlette's 1 MB part limit -> 413 naming `serve.max_text_chars`;
* a text field BentoML's ``json.loads`` chokes on (a 5,000-digit number: ValueError; deeply
  nested brackets: RecursionError) -> 400.

tests/test_service_multipart.py replays each of them against the installed BentoML's own,
unpatched serde and fails once BentoML answers one of them itself: then that part can go.
`apply()` is idempotent and keeps BentoML's behaviour when its internals moved (ImportError).
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

WRITTEN_FOR = "1.4.40"
_MARK = "__marketplace_hardened__"


def original_serde() -> tuple[Any, Any]:
    """BentoML's own (parse_request, ensure_file), whether or not `apply()` ran in this process."""
    from _bentoml_impl.serde import MultipartSerde

    saved = getattr(MultipartSerde, "__marketplace_original__", None)
    if saved is not None:
        return saved
    return MultipartSerde.parse_request, MultipartSerde.ensure_file


def apply(max_text_chars: int) -> bool:
    """Patch `MultipartSerde` in this process; True when patched (now or before)."""
    try:
        from _bentoml_impl.serde import MultipartSerde
        from bentoml.exceptions import BentoMLException, InvalidArgument
        from pydantic import ValidationError
        from starlette.datastructures import UploadFile
        from starlette.exceptions import HTTPException as StarletteHTTPException
        from starlette.formparsers import MultiPartException
    except ImportError:  # another BentoML layout: keep its behaviour
        return False
    if getattr(MultipartSerde, _MARK, False):
        return True
    original_parse, original_ensure = MultipartSerde.parse_request, MultipartSerde.ensure_file

    async def parse_request(self: Any, request: Any, cls: Any) -> Any:
        try:
            return await original_parse(self, request, cls)
        except (StarletteHTTPException, MultiPartException) as exc:
            status = getattr(exc, "status_code", 400)
            if not 400 <= status < 500:
                raise
            detail = str(getattr(exc, "detail", None) or getattr(exc, "message", None) or exc)
            if "maximum size" in detail:
                raise BentoMLException(
                    f"a multipart text field is too large ({detail}); 'text' may hold at most "
                    f"{max_text_chars:,} characters",
                    error_code=HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                ) from exc
            raise InvalidArgument(f"malformed multipart/form-data request: {detail}") from exc
        except ValidationError:
            raise  # BentoML answers these with a 400 listing the fields
        except (ValueError, TypeError, RecursionError) as exc:
            raise InvalidArgument(f"a multipart form field could not be parsed: {str(exc)[:200]}") from exc

    async def ensure_file(obj: Any) -> Any:
        if isinstance(obj, UploadFile):
            return obj
        raise InvalidArgument(
            "'image' must be uploaded as a file (a multipart/form-data part with a filename); "
            "text values and URLs are not accepted"
        )

    MultipartSerde.__marketplace_original__ = (original_parse, original_ensure)
    MultipartSerde.ensure_file = staticmethod(ensure_file)
    MultipartSerde.parse_request = parse_request
    setattr(MultipartSerde, _MARK, True)
    return True
