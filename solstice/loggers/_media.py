"""Images and histograms for the loggers: checked on the caller's thread (shapes and dtypes
only), copied on the device, converted to host arrays on a logging thread.

An image is a 2-D `(height, width)` array (grayscale) or a 3-D `(height, width, channels)`
array with 1, 3 or 4 channels (grayscale, RGB, RGBA), channels last as in JAX; its dtype is
`uint8` (0 to 255), `bool`, or floating (0.0 to 1.0, clipped; NaN becomes 0). On the host it
becomes a `uint8` array `(height, width, channels)`. A histogram is drawn from the finite values
of an array of any shape and real dtype.
"""

import struct
import zlib
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

HISTOGRAM_BINS = 64


def _array(name: Any, value: Any, what: str) -> Any:
    if not isinstance(name, str):
        raise TypeError(
            f"{what} names must be strings, got {name!r} of type {type(name).__name__}. Use "
            "names such as `'val/samples'`."
        )
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        raise ValueError(
            f"{what} {name!r} is sharded over several processes, so this process cannot "
            "read all of it. Gather it first, e.g. "
            "`jax.experimental.multihost_utils.process_allgather(x)`, or log this process's "
            "shard (`x.addressable_data(0)`)."
        )
    if isinstance(value, jax.Array | np.ndarray):
        return value
    try:
        return np.asarray(value)
    except Exception as error:
        raise TypeError(
            f"{what} {name!r} is {value!r} of type {type(value).__name__}, not an array. Pass "
            "a JAX or numpy array."
        ) from error


def _check_mapping(values: Any, what: str, example: str) -> None:
    if not isinstance(values, Mapping):
        raise TypeError(
            f"{what}s must be a mapping of name -> array, got {type(values).__name__}. Pass a "
            f"dict such as `{example}`."
        )


def check_images(images: Mapping[str, Any]) -> dict[str, Any]:
    """Check every image of `images` (shape and dtype only: nothing is copied from the
    device); returns them as arrays (non-arrays converted with `np.asarray`).

    Raises `TypeError` for a name that is not a string or a dtype that is not `uint8`,
    `bool` or floating, and `ValueError` for a shape that is not an image's.
    """
    _check_mapping(images, "Image", "{'val/sample': x}")
    out: dict[str, Any] = {}
    for name, value in images.items():
        image = _array(name, value, "Image")
        shape = tuple(image.shape)
        if (
            len(shape) not in (2, 3)
            or (len(shape) == 3 and shape[-1] not in (1, 3, 4))
            or 0 in shape
        ):
            hint = ""
            if len(shape) == 3 and shape[0] in (1, 3, 4):
                hint = " It looks channels-first: move the channels last, `jnp.moveaxis(x, 0, -1)`."
            elif len(shape) == 4:
                hint = (
                    " It looks like a batch: log each image under its own name, e.g. "
                    "`{f'samples/{i}': x[i] for i in range(4)}`."
                )
            raise ValueError(
                f"Image {name!r} has shape {shape}, but an image is `(height, width)` or "
                f"`(height, width, channels)` with 1, 3 or 4 channels, none of them 0.{hint}"
            )
        dtype = image.dtype
        if not (dtype == jnp.uint8 or dtype == jnp.bool_ or jnp.issubdtype(dtype, jnp.floating)):
            raise TypeError(
                f"Image {name!r} has dtype {dtype}, but images are uint8 (0 to 255), bool, or "
                "floating (0.0 to 1.0). Convert it, e.g. `x.astype(jnp.uint8)` or `x / 255.0`."
            )
        out[name] = image
    return out


def check_histograms(values: Mapping[str, Any]) -> dict[str, Any]:
    """Check every array of `values` (dtype only); returns them as arrays.

    Raises `TypeError` for a name that is not a string or a dtype that is not real.
    """
    _check_mapping(values, "Histogram", "{'params/w': w}")
    out: dict[str, Any] = {}
    for name, value in values.items():
        array = _array(name, value, "Histogram")
        dtype = array.dtype
        if not any(jnp.issubdtype(dtype, kind) for kind in (jnp.bool_, jnp.integer, jnp.floating)):
            raise TypeError(
                f"Histogram {name!r} has dtype {dtype}, but histograms are drawn from real "
                "numbers (bool, integer or floating dtypes). Convert it, e.g. `jnp.abs(x)`."
            )
        out[name] = array
    return out


def copy_arrays(values: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of every array of `values` that a caller could change or lose (the next step
    donates the experiment's device buffers): a device copy for JAX arrays (no sync), a host
    copy for numpy arrays."""
    return {
        name: jnp.copy(value) if isinstance(value, jax.Array) else np.array(value, copy=True)
        for name, value in values.items()
    }


def _host(values: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Every array on the host, with one `jax.device_get` for all the device ones."""
    host = jax.device_get(dict(values))
    return {name: np.asarray(value) for name, value in host.items()}


def _to_uint8(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint8:
        pixels = image
    elif image.dtype == np.bool_:
        pixels = image.astype(np.uint8) * np.uint8(255)
    else:
        scaled = np.nan_to_num(image.astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0)
        pixels = np.rint(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return np.ascontiguousarray(pixels)


def to_host_images(images: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """`images` (checked) as `uint8` host arrays of shape `(height, width, channels)`, with
    one device-to-host copy for all of them (call it off the training thread)."""
    return {name: _to_uint8(image) for name, image in _host(check_images(images)).items()}


def to_host_arrays(values: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """`values` (checked) as host arrays, with one device-to-host copy for all of them."""
    return _host(check_histograms(values))


class Histogram(NamedTuple):
    """A histogram of the finite values of an array: `counts[i]` values lie in
    `[edges[i], edges[i + 1])` (the last bin includes its right edge); `num`, `min`, `max`,
    `sum` and `sum_squares` describe those values (`min`/`max` are 0 when there are none)."""

    edges: np.ndarray
    counts: np.ndarray
    num: int
    min: float
    max: float
    sum: float
    sum_squares: float


def histogram(values: Any, bins: int = HISTOGRAM_BINS) -> Histogram:
    """The `Histogram` of the finite values of `values` (any shape), in `bins` equal bins
    spanning them (numpy's `histogram`: a single value gets a bin of width 1 around it)."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    flat = flat[np.isfinite(flat)]
    counts, edges = np.histogram(flat, bins=bins)
    if flat.size == 0:
        return Histogram(edges, counts, 0, 0.0, 0.0, 0.0, 0.0)
    return Histogram(
        edges,
        counts,
        int(flat.size),
        float(flat.min()),
        float(flat.max()),
        float(flat.sum()),
        float(np.dot(flat, flat)),
    )


def encode_png(image: np.ndarray) -> bytes:
    """A `uint8` `(height, width, channels)` image (1, 3 or 4 channels) as PNG bytes."""
    height, width, channels = image.shape
    colour_type = {1: 0, 3: 2, 4: 6}[channels]
    rows = image.reshape(height, width * channels)
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1).tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )
