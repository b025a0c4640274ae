"""The restricted unpickler for the official `.pkl` log-mel files (docs/AVSBENCH.md section 4)."""

from __future__ import annotations

import collections
import io
import os
import pickle
from pathlib import Path

import pytest
import torch

from avseg.data.safe_pickle import load_tensor_pickle
from avseg.errors import DataError, UnsafePickleError


class _RunsCommand:
    """Unpickling this calls os.system(command): the classic pickle payload."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _StorageFromBytes:
    """Pickles as `torch.storage._load_from_bytes(data)`, as a tensor's storage does."""

    def __init__(self, data: bytes):
        self.data = data

    def __reduce__(self):
        return (torch.storage._load_from_bytes, (self.data,))


class _TensorWithStorage:
    """Pickles exactly like a float tensor of shape [n], but with a chosen storage object."""

    def __init__(self, storage: object, length: int):
        self.storage = storage
        self.length = length

    def __reduce__(self):
        return (
            torch._utils._rebuild_tensor_v2,
            (self.storage, 0, (self.length,), (1,), False, collections.OrderedDict()),
        )


def _touch_command(marker: Path) -> str:
    return f"touch {marker}"


def _nested_payload_bytes(marker: Path) -> bytes:
    """What torch.save (legacy format, as Storage.__reduce__ uses) writes for a payload object."""
    buffer = io.BytesIO()
    torch.save(_RunsCommand(_touch_command(marker)), buffer, _use_new_zipfile_serialization=False)
    return buffer.getvalue()


def test_genuine_tensor_pickle_with_requires_grad_loads(tmp_path):
    original = torch.randn(5, 1, 96, 64).requires_grad_()
    path = tmp_path / "clip.pkl"
    with open(path, "wb") as handle:
        pickle.dump(original, handle)
    loaded = load_tensor_pickle(path)
    assert isinstance(loaded, torch.Tensor)
    assert not loaded.requires_grad and loaded.grad_fn is None
    assert loaded.dtype == torch.float32 and tuple(loaded.shape) == (5, 1, 96, 64)
    torch.testing.assert_close(loaded, original.detach(), rtol=0, atol=0)


def test_genuine_pickles_of_every_protocol_and_a_parameter_load(tmp_path):
    original = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        path = tmp_path / f"p{protocol}.pkl"
        path.write_bytes(pickle.dumps(original, protocol=protocol))
        torch.testing.assert_close(load_tensor_pickle(path), original, rtol=0, atol=0)
    path = tmp_path / "parameter.pkl"
    path.write_bytes(pickle.dumps(torch.nn.Parameter(original.clone())))
    loaded = load_tensor_pickle(path)
    assert type(loaded) is torch.Tensor and not loaded.requires_grad
    torch.testing.assert_close(loaded, original, rtol=0, atol=0)


def test_top_level_payload_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned_top"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(_RunsCommand(_touch_command(marker))))
    with pytest.raises(UnsafePickleError) as info:
        load_tensor_pickle(path)
    assert not marker.exists()
    assert str(path) in str(info.value)
    assert "system" in info.value.problem  # the refused global is named (posix.system / nt.system)


def test_payload_in_nested_storage_bytes_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned_nested"  # the next test shows the same payload is live
    path = tmp_path / "evil_nested.pkl"
    path.write_bytes(pickle.dumps(_TensorWithStorage(_StorageFromBytes(_nested_payload_bytes(marker)), 4)))
    with pytest.raises(UnsafePickleError) as info:
        load_tensor_pickle(path)
    assert not marker.exists()
    assert str(path) in str(info.value)
    assert "torch.storage._load_from_bytes" in info.value.problem
    assert "system" in info.value.problem  # torch's weights-only refusal names the inner global

    # Same payload with _load_from_bytes at top level.
    top = tmp_path / "evil_storage.pkl"
    top.write_bytes(pickle.dumps(_StorageFromBytes(_nested_payload_bytes(marker))))
    with pytest.raises(UnsafePickleError):
        load_tensor_pickle(top)
    assert not marker.exists()


def test_the_nested_attack_is_real_with_plain_pickle(tmp_path):
    """Proves the previous test's payload is live: an unrestricted pickle.load runs it."""
    marker = tmp_path / "pwned_plain"
    data = pickle.dumps(_StorageFromBytes(_nested_payload_bytes(marker)))
    assert pickle.loads(data) == 0  # os.system's exit status: the command ran
    assert marker.exists()


def test_other_globals_are_refused(tmp_path):
    path = tmp_path / "eval.pkl"
    path.write_bytes(pickle.dumps(collections.Counter("abc")))
    with pytest.raises(UnsafePickleError, match="collections.Counter"):
        load_tensor_pickle(path)

    class _Rot13:
        def __reduce__(self):
            import _codecs

            return (_codecs.encode, ("payload", "rot13"))

    codec = tmp_path / "codec.pkl"
    codec.write_bytes(pickle.dumps(_Rot13()))
    with pytest.raises(UnsafePickleError, match="latin-1"):
        load_tensor_pickle(codec)


def test_non_tensor_pickles_are_data_errors(tmp_path):
    path = tmp_path / "dict.pkl"
    path.write_bytes(pickle.dumps({"log_mel": [1.0, 2.0]}))
    with pytest.raises(DataError, match="dict") as info:
        load_tensor_pickle(path)
    assert not isinstance(info.value, UnsafePickleError)

    storage_only = tmp_path / "storage.pkl"
    storage_only.write_bytes(pickle.dumps(torch.zeros(3).untyped_storage()))
    with pytest.raises(DataError, match="UntypedStorage"):
        load_tensor_pickle(storage_only)


def test_missing_truncated_and_garbage_files_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_tensor_pickle(tmp_path / "absent.pkl")

    good = pickle.dumps(torch.randn(5, 1, 96, 64))
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError) as info:
        load_tensor_pickle(truncated)
    assert str(truncated) in str(info.value)

    empty = tmp_path / "empty.pkl"
    empty.write_bytes(b"")
    with pytest.raises(DataError):
        load_tensor_pickle(empty)

    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(b"\x00not a pickle at all")
    with pytest.raises(DataError):
        load_tensor_pickle(garbage)


def test_path_errors_survive_pickling():
    """DataError / CheckpointError cross process boundaries (submitit job results, DDP) intact."""
    import pickle

    from avseg.errors import CheckpointError, DataError, UnsafePickleError

    for cls in (DataError, CheckpointError, UnsafePickleError):
        err = pickle.loads(pickle.dumps(cls("/data/x.pkl", "truncated")))
        assert type(err) is cls
        assert (err.path, err.problem, str(err)) == ("/data/x.pkl", "truncated", "/data/x.pkl: truncated")


def test_path_errors_pickle_with_path_and_problem() -> None:
    import pickle

    from avseg.errors import CheckpointError, PathError

    for cls in (DataError, UnsafePickleError, CheckpointError):
        error = pickle.loads(pickle.dumps(cls("/x/y.pt", "truncated")))
        assert type(error) is cls and isinstance(error, PathError) and isinstance(error, ValueError)
        assert (error.path, error.problem, str(error)) == ("/x/y.pt", "truncated", "/x/y.pt: truncated")
