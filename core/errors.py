"""The exception family every component raises and catches.

One base, a few children, each naming what went wrong for whom: a peer sent a bad
frame (ProtocolError), a user asked for a bad filter or sent a bad image
(FilterError and its image children), or the operator set a bad setting
(ConfigError). Each carries ``field`` (what was at fault) and ``status`` (the HTTP
status the gateway answers with), so no component needs a mapping table.
"""

from __future__ import annotations


class ImgpipeError(Exception):
    """Base of every error imgpipe raises on purpose."""

    status = 500
    error = "internal"

    def __init__(self, detail: str, *, field: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field

    def to_dict(self) -> dict[str, str]:
        out = {"error": self.error, "detail": self.detail}
        if self.field:
            out["field"] = self.field
        return out


class ConfigError(ImgpipeError):
    """A setting is missing or out of range; the message says what to change."""

    error = "config"


class ProtocolError(ImgpipeError):
    """A peer sent frames that are not a message of this protocol version."""

    status = 400
    error = "protocol"


class FilterError(ImgpipeError):
    """A chain names an unknown filter or a parameter is missing, mistyped or out of range."""

    status = 400
    error = "bad_ops"


class ImageError(ImgpipeError):
    """Bytes that are not a decodable image of an allowed format (HTTP 415)."""

    status = 415
    error = "unsupported_image"


class ImageTooLarge(ImageError):
    """An image whose header claims more pixels than allowed (HTTP 413)."""

    status = 413
    error = "too_large"
