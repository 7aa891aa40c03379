"""service/multipart.py, the work-around for BentoML's multipart parsing: is it still needed?

`test_upstream_*` replay each request the work-around exists for against the installed BentoML's
own, unpatched `MultipartSerde` and assert that BentoML still gets it wrong (an exception its API
wrapper answers with a 500, or a fetch of a URL sent as a file). When one of them fails, BentoML
fixed that case: drop that part of service/multipart.py (and this test's case). The other tests check
the work-around's answers. No server: the serde is driven with Starlette requests built in memory.
"""

from __future__ import annotations

import asyncio
import json
import typing
from pathlib import Path

import pydantic
import pytest

pytest.importorskip("_bentoml_impl.serde", reason="BentoML's internal layout changed: service/multipart.py is inert")

from bentoml.exceptions import BentoMLException  # noqa: E402
from starlette.requests import Request  # noqa: E402

from service import multipart  # noqa: E402

BOUNDARY = "xyz"


def _request(body: bytes, content_type: str = f"multipart/form-data; boundary={BOUNDARY}") -> Request:
    scope = {"type": "http", "method": "POST", "path": "/predict", "query_string": b"",
             "headers": [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]}
    sent = {"done": False}

    async def receive() -> dict[str, typing.Any]:
        if sent["done"]:
            return {"type": "http.disconnect"}
        sent["done"] = True
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(scope, receive)


def _text_field(name: str, value: bytes) -> bytes:
    return (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value
            + f"\r\n--{BOUNDARY}--\r\n".encode())


class Form(pydantic.BaseModel):
    """The shape of the service's /predict input as BentoML builds it (a file field and a text field)."""

    multipart_fields: typing.ClassVar[set[str]] = {"image"}
    image: Path = None  # type: ignore[assignment]
    text: typing.Optional[str] = None


def _answer(coroutine: typing.Awaitable[typing.Any]) -> str:
    """What BentoML's API wrapper would answer: '4xx', '500' or 'parsed' (no exception)."""
    try:
        asyncio.run(asyncio.wait_for(coroutine, timeout=30))
    except asyncio.TimeoutError:  # still fetching the "URL": BentoML's API timeout, then a 500
        return "500"
    except pydantic.ValidationError:
        return "4xx"
    except BentoMLException as exc:
        return "4xx" if 400 <= int(exc.error_code) < 500 else "500"
    except Exception:  # noqa: BLE001 - anything else is BentoML's 500
        return "500"
    return "parsed"


CASES = {
    # a file parameter sent as a text value: fetched as a URL (".invalid" never resolves, so the
    # fetch fails whether or not BentoML's loopback guard, which needs uvloop, is importable)
    "image-as-url": lambda parse, ensure: ensure("http://photo.invalid/photo.jpg"),
    "image-as-text": lambda parse, ensure: ensure("just some text"),
    # BentoML json.loads() every multipart text field
    "5001-digit-number": lambda parse, ensure: parse(_request(_text_field("text", b"9" * 5001)), Form),
    "deeply-nested-json": lambda parse, ensure: parse(_request(_text_field("text", b"[" * 100_000)), Form),
    # a multipart content type without a boundary
    "no-boundary": lambda parse, ensure: parse(_request(b"garbage", "multipart/form-data"), Form),
}


def _unpatched() -> tuple[typing.Any, typing.Any]:
    from _bentoml_impl.serde import MultipartSerde

    original_parse, original_ensure = multipart.original_serde()
    serde = MultipartSerde()
    return (lambda request, cls: original_parse(serde, request, cls)), original_ensure


@pytest.mark.parametrize("case", sorted(CASES))
def test_upstream_bentoml_still_needs_the_work_around(case: str) -> None:
    import bentoml

    answer = _answer(CASES[case](*_unpatched()))
    assert answer == "500", (
        f"BentoML {bentoml.__version__} now answers the multipart case {case!r} itself ({answer}); "
        f"service/multipart.py was written for BentoML {multipart.WRITTEN_FOR}: drop the part of the "
        "work-around for this case (and this case here)"
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_work_around_answers_each_case_with_a_4xx(case: str) -> None:
    from _bentoml_impl.serde import MultipartSerde

    assert multipart.apply(max_text_chars=100_000)
    serde = MultipartSerde()
    answer = _answer(CASES[case](lambda request, cls: serde.parse_request(request, cls), MultipartSerde.ensure_file))
    assert answer == "4xx", case


def test_the_work_around_still_parses_good_forms() -> None:
    from _bentoml_impl.serde import MultipartSerde

    multipart.apply(max_text_chars=100_000)
    parsed = asyncio.run(MultipartSerde().parse_request(_request(_text_field("text", json.dumps("oak table").encode())),
                                                        Form))
    assert parsed.text == "oak table" and parsed.image is None


def test_the_docstring_names_the_version_it_was_written_for() -> None:
    assert f"BentoML {multipart.WRITTEN_FOR}" in (multipart.__doc__ or "").replace("**", "")
