"""The evaluator's wire encoding (behavior_data_and_protocol §4.3): msgpack with numpy arrays as bin-keyed maps.

An ndarray travels as {b"__ndarray__": True, b"data": C-order bytes, b"dtype": arr.dtype.str, b"shape": [...]},
a numpy scalar as {b"__npgeneric__": True, b"data": value, b"dtype": str}; this is byte-identical to
openpi-client's and BEHAVIOR's msgpack_numpy, so either side can be ours or theirs.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

# Numeric and bool dtypes only: object, void and complex arrays cannot be rebuilt safely from raw bytes.
_WIRE_KINDS = frozenset("biuf")


class ProtocolError(ValueError):
    """A message that is not what the protocol allows; the text names the problem."""


def _encode(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in _WIRE_KINDS:
            raise ProtocolError(f"cannot send an array of dtype {obj.dtype}: only numeric and bool arrays go on "
                                f"the wire")
        return {b"__ndarray__": True, b"data": np.ascontiguousarray(obj).tobytes(), b"dtype": obj.dtype.str,
                b"shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        if obj.dtype.kind not in _WIRE_KINDS:
            raise ProtocolError(f"cannot send a numpy scalar of dtype {obj.dtype}")
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot serialize {type(obj).__name__}")


def _decode(obj: dict) -> Any:
    if b"__ndarray__" in obj:
        try:
            dtype = np.dtype(obj[b"dtype"])
            if dtype.kind not in _WIRE_KINDS:
                raise ProtocolError(f"array dtype {dtype} is not allowed (numeric or bool only)")
            shape = tuple(int(d) for d in obj[b"shape"])
            need = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
            if any(d < 0 for d in shape) or len(obj[b"data"]) != need:
                raise ProtocolError(f"ndarray data has {len(obj[b'data'])} bytes, but dtype {dtype} and shape "
                                    f"{list(shape)} need {need}")
            return np.ndarray(buffer=obj[b"data"], dtype=dtype, shape=shape)
        except ProtocolError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError(f"malformed ndarray in the message: {e}") from e
    if b"__npgeneric__" in obj:
        try:
            dtype = np.dtype(obj[b"dtype"])
            if dtype.kind not in _WIRE_KINDS:
                raise ProtocolError(f"numpy scalar dtype {dtype} is not allowed")
            return dtype.type(obj[b"data"])
        except ProtocolError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError(f"malformed numpy scalar in the message: {e}") from e
    return obj


def pack(obj: Any) -> bytes:
    """Encode a (nested) dict of numpy arrays, scalars and plain values."""
    return msgpack.packb(obj, default=_encode)


def unpack(data: bytes) -> Any:
    """Decode a message; ProtocolError naming the problem on anything that is not valid msgpack-numpy.
    Arrays are read-only views of the message bytes."""
    try:
        return msgpack.unpackb(data, object_hook=_decode, strict_map_key=False)
    except ProtocolError:
        raise
    except (msgpack.exceptions.ExtraData, msgpack.exceptions.FormatError, msgpack.exceptions.StackError,
            ValueError, TypeError) as e:
        raise ProtocolError(f"the message is not valid msgpack ({type(e).__name__}: {e}); send msgpack-numpy "
                            f"as openpi_client.msgpack_numpy.packb does") from e
