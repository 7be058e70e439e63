"""serving.wire: the evaluator's msgpack-numpy encoding (behavior_data_and_protocol §4.3).

Checks the exact bytes of the spec's examples, byte-identity with openpi-client's encoder in both directions,
and that malformed or unsafe messages raise ProtocolError with a message naming the problem.
"""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from openpi_client import msgpack_numpy

from serving.wire import ProtocolError, pack, unpack


def _ndarray_map(data: bytes, dtype: str, shape: list[int]) -> bytes:
    """A hand-built ndarray map, as a (possibly hostile) client could send it."""
    return msgpack.packb({"obs": {b"__ndarray__": True, b"data": data, b"dtype": dtype, b"shape": shape}})


def _sample() -> dict:
    rng = np.random.default_rng(0)
    return {
        "rgb": rng.integers(0, 256, (224, 224, 4), dtype=np.uint8),
        "robot_r1::proprio": rng.normal(size=256).astype(np.float32),
        "task_id": np.array([17], dtype=np.int64),
        "scalar": np.float32(1.5),
        "count": np.int64(-3),
        "flag": True,
        "nested": {"name": "x", "values": [1, 2.5]},
    }


def test_action_message_matches_the_spec_bytes():
    expected = (b"\x81\xa6action\x84"
                b"\xc4\x0b__ndarray__\xc3"
                b"\xc4\x04data\xc4\x08" + np.float32([1, 2]).tobytes() +
                b"\xc4\x05dtype\xa3<f4"
                b"\xc4\x05shape\x91\x02")
    assert np.float32([1, 2]).tobytes() == b"\x00\x00\x80\x3f\x00\x00\x00\x40"  # little-endian 1.0, 2.0
    assert pack({"action": np.float32([1, 2])}) == expected


def test_reset_message_matches_the_spec_bytes():
    assert pack({"reset": True}) == b"\x81\xa5reset\xc3"
    assert unpack(b"\x81\xa5reset\xc3") == {"reset": True}


def test_pack_is_byte_identical_to_openpi_client():
    obj = _sample()
    assert pack(obj) == msgpack_numpy.packb(obj)
    # Non-contiguous and Fortran-ordered arrays travel as C-order bytes on both sides.
    odd = {"t": np.arange(12, dtype=np.float32).reshape(3, 4).T, "s": np.arange(10, dtype=np.int16)[::3]}
    assert pack(odd) == msgpack_numpy.packb(odd)


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        got = b[key]
        if isinstance(value, (np.ndarray, np.generic)):
            assert type(got) is type(value), key
            assert got.dtype == value.dtype and got.shape == value.shape, key
            np.testing.assert_array_equal(got, value)
        else:
            assert got == value, key


def test_unpack_reads_openpi_bytes():
    obj = _sample()
    decoded = unpack(msgpack_numpy.packb(obj))
    _assert_same(obj, decoded)
    assert decoded["rgb"].dtype == np.uint8 and decoded["rgb"].shape == (224, 224, 4)
    assert decoded["task_id"].dtype == np.int64 and int(decoded["task_id"][0]) == 17
    assert not decoded["robot_r1::proprio"].flags.writeable  # a read-only view of the message


def test_openpi_reads_our_bytes():
    obj = _sample()
    _assert_same(obj, msgpack_numpy.unpackb(pack(obj)))


def test_round_trip_of_every_wire_dtype():
    for dtype in ("?", "u1", "i2", "<u4", "<i8", "<f2", "<f4", "<f8", ">f4"):
        arr = (np.arange(6) % 2 == 0) if dtype == "?" else np.arange(6).astype(dtype)
        arr = arr.reshape(2, 3)
        got = unpack(pack({"a": arr}))["a"]
        assert got.dtype == arr.dtype and got.shape == (2, 3)
        np.testing.assert_array_equal(got, arr)
    empty = unpack(pack({"a": np.zeros((0, 23), np.float32)}))["a"]
    assert empty.shape == (0, 23) and empty.dtype == np.float32


@pytest.mark.parametrize("data, match", [
    (b"\xc1\xc1\xc1", "not valid msgpack"),  # 0xc1 is never used by msgpack
    (b"hello world", "not valid msgpack"),  # a fixint followed by junk
    (b"", "not valid msgpack"),
])
def test_garbage_is_a_protocol_error(data, match):
    with pytest.raises(ProtocolError, match=match):
        unpack(data)


def test_truncated_message_is_a_protocol_error():
    whole = pack({"action": np.float32([1, 2])})
    for cut in (1, 10, len(whole) - 1):
        with pytest.raises(ProtocolError, match="not valid msgpack"):
            unpack(whole[:cut])


def test_data_shorter_than_shape_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="has 4 bytes, but dtype float32 and shape \\[2\\] need 8"):
        unpack(_ndarray_map(b"\0" * 4, "<f4", [2]))
    with pytest.raises(ProtocolError, match="shape \\[-2\\]"):
        unpack(_ndarray_map(b"\0" * 8, "<f4", [-2]))


def test_data_longer_than_shape_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="has 12 bytes, but dtype float32 and shape \\[2\\] need 8"):
        unpack(_ndarray_map(b"\0" * 12, "<f4", [2]))


@pytest.mark.parametrize("dtype, shown", [("O", "object"), ("|V8", "|V8"), ("<c8", "complex64"),
                                          ("<c16", "complex128")])
def test_unsafe_dtypes_are_rejected_on_unpack(dtype, shown):
    with pytest.raises(ProtocolError, match=f"array dtype {shown} is not allowed"):
        unpack(_ndarray_map(b"\0" * 16, dtype, [1]))


def test_bad_dtype_and_scalar_maps_are_protocol_errors():
    with pytest.raises(ProtocolError, match="malformed ndarray.*'zz'"):
        unpack(_ndarray_map(b"\0" * 8, "zz", [1]))
    with pytest.raises(ProtocolError, match="malformed ndarray"):  # no b"shape"
        unpack(msgpack.packb({b"__ndarray__": True, b"data": b"\0" * 4, b"dtype": "<f4"}))
    with pytest.raises(ProtocolError, match="numpy scalar dtype complex64 is not allowed"):
        unpack(msgpack.packb({b"__npgeneric__": True, b"data": 1.0, b"dtype": "<c8"}))


def test_packing_unsafe_values_raises():
    with pytest.raises(ProtocolError, match="dtype object"):
        pack({"a": np.array([object(), 1], dtype=object)})
    with pytest.raises(ProtocolError, match="complex64"):
        pack({"a": np.zeros(2, np.complex64)})
    with pytest.raises(ProtocolError, match="numpy scalar of dtype complex128"):
        pack({"a": np.complex128(1)})
    with pytest.raises(TypeError, match="cannot serialize set"):
        pack({"a": {1, 2}})
    assert issubclass(ProtocolError, ValueError)
