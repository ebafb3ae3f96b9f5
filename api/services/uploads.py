"""Streaming multipart parsing: file parts go to disk chunk by chunk, with the size limit enforced
as bytes arrive (a form parser that spools the whole body first would fill the disk before any check)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from fastapi import Request
from python_multipart.multipart import MultipartParser, parse_options_header

from api.errors import ApiError

FIELD_LIMIT = 256 * 1024
# Only the extension of a user's file name is kept (core picks the reader by it), and only if it is tame.
_SUFFIX = re.compile(r"^(\.[a-z0-9]{1,12}){1,2}$")


@dataclass
class Form:
    files: dict[str, Path] = field(default_factory=dict)
    filenames: dict[str, str] = field(default_factory=dict)
    fields: dict[str, str] = field(default_factory=dict)


def safe_suffix(filename: str | None) -> str:
    if not filename:
        return ""
    name = filename.replace("\\", "/").rsplit("/", 1)[-1].lower()
    suffixes = "".join(Path(name).suffixes[-2:])
    return suffixes if _SUFFIX.match(suffixes) else ""


class _Receiver:
    def __init__(self, dest: Path, file_fields: set[str], max_file_bytes: int) -> None:
        self.dest, self.file_fields, self.max_file_bytes = dest, file_fields, max_file_bytes
        self.form = Form()
        self.error: ApiError | None = None
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._name = ""
        self._handle: IO[bytes] | None = None
        self._buffer = bytearray()
        self._size = 0

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, start, end: self._add("_header_field", data[start:end]),
            "on_header_value": lambda data, start, end: self._add("_header_value", data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _add(self, attr: str, data: bytes) -> None:
        setattr(self, attr, getattr(self, attr) + data)

    def _part_begin(self) -> None:
        self._headers, self._buffer, self._size, self._name = {}, bytearray(), 0, ""

    def _header_end(self) -> None:
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field = self._header_value = b""

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = params.get(b"name", b"").decode("utf-8", "replace")
        if self._name in self.file_fields and self._name not in self.form.files:
            filename = params.get(b"filename", b"").decode("utf-8", "replace")
            path = self.dest / f"{self._name}{safe_suffix(filename)}"
            self.form.files[self._name] = path
            self.form.filenames[self._name] = filename[:300]
            self._handle = path.open("wb")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self.error is not None:
            return
        self._size += end - start
        if self._handle is not None:
            if self._size > self.max_file_bytes:
                self.error = ApiError(413, "file_too_large",
                                      f"The {self._name} file is larger than {self.max_file_bytes} bytes.",
                                      "Upload a smaller file, or ask the operator to raise IDAP_MAX_UPLOAD_BYTES.")
                return
            self._handle.write(data[start:end])
        elif self._name:
            if self._size > FIELD_LIMIT:
                self.error = ApiError(413, "field_too_large", f"The form field {self._name} is too large.",
                                      f"Form fields other than files are limited to {FIELD_LIMIT} bytes.")
                return
            self._buffer += data[start:end]

    def _part_end(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        elif self._name and self.error is None:
            self.form.fields[self._name] = self._buffer.decode("utf-8", "replace")

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()


async def receive_form(request: Request, dest: Path, file_fields: set[str], max_file_bytes: int) -> Form:
    """Read a multipart/form-data body into `dest` (files) and memory (small fields)."""
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise ApiError(415, "unsupported_media_type", "The request body must be multipart/form-data.",
                       "Send the files as form fields, e.g. curl -F model=@model.safetensors -F data=@data.npz.")
    length = request.headers.get("content-length")
    allowed = len(file_fields) * max_file_bytes + FIELD_LIMIT * 4
    if length is not None and length.isdigit() and int(length) > allowed:
        raise ApiError(413, "file_too_large", f"The request body is larger than {allowed} bytes.",
                       "Upload smaller files, or ask the operator to raise IDAP_MAX_UPLOAD_BYTES.")
    receiver = _Receiver(dest, file_fields, max_file_bytes)
    parser = MultipartParser(boundary, receiver.callbacks())  # type: ignore[arg-type]
    try:
        async for chunk in request.stream():
            parser.write(chunk)
            if receiver.error is not None:
                raise receiver.error
        parser.finalize()
    except ApiError:
        raise
    except Exception as exc:  # the parser reports malformed bodies with its own exception types
        raise ApiError(400, "bad_multipart", f"The multipart body could not be parsed: {exc}.",
                       "Send a well-formed multipart/form-data body.") from exc
    finally:
        receiver.close()
    return receiver.form
