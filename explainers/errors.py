"""Exceptions raised by the library. Each carries a message meant for the person who gave the input."""


class ExplainersError(Exception):
    """Base class of every error this library raises on purpose."""


class LayerNotFoundError(ExplainersError, KeyError):
    """A layer name that the model does not have."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class BackboneError(ExplainersError):
    """Unknown backbone name, or weights that cannot be found offline."""


class ImageLoadError(ExplainersError):
    """A file that cannot be used as a photo (missing, empty, truncated, not an image, too large)."""


class UnknownTagError(ExplainersError, KeyError):
    """A tag that maps to no classifier class."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class RefusedTagError(UnknownTagError):
    """A known tag that the classifier has no class for ("person", "sky" with ImageNet-1k), refused on
    purpose: ``reason`` says why, in a sentence; ``tag`` is the tag as given."""

    def __init__(self, message: str, tag: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.tag = tag
        self.reason = reason
