"""cpkernels.io: the sha256 digests that adapter files and checkpoints record and verify."""
import warnings

import pytest
import torch

from cpkernels.io import ChecksumError, MissingChecksumWarning, file_digest, tensor_digest, verify_digests


def test_tensor_digest_is_a_function_of_dtype_shape_and_values():
    t = torch.randn(5, 3)
    assert tensor_digest(t) == tensor_digest(t.clone()) == tensor_digest(t.T.contiguous().T)  # strides don't count
    assert tensor_digest(t) != tensor_digest(t.reshape(3, 5))          # same bytes, other shape
    assert tensor_digest(t) != tensor_digest(t.view(torch.int32))      # same bytes, other dtype
    u = t.clone()
    u.view(torch.int32)[2, 1] ^= 1                                     # one bit
    assert tensor_digest(t) != tensor_digest(u)
    for odd in (torch.tensor(3), torch.empty(4, 0), torch.randn(3).bfloat16(), torch.tensor([True, False])):
        assert len(tensor_digest(odd)) == 64
    if torch.cuda.is_available():
        assert tensor_digest(t.cuda()) == tensor_digest(t)


def test_file_digest(tmp_path):
    import hashlib
    (tmp_path / "f").write_bytes(b"x" * (3 << 20))
    assert file_digest(tmp_path / "f") == hashlib.sha256(b"x" * (3 << 20)).hexdigest()


def test_verify_digests_names_the_file_and_the_item():
    verify_digests("f", {"a": "1", "b": "2"}, {"a": "1", "b": "2"})
    with pytest.raises(ChecksumError, match=r"^f: tensor 'b' does not match its sha256 checksum"):
        verify_digests("f", {"a": "1", "b": "3"}, {"a": "1", "b": "2"})
    with pytest.raises(ChecksumError, match=r"^f: file 'c' has a recorded sha256 checksum but is missing"):
        verify_digests("f", {}, {"c": "1"}, "file")
    with pytest.raises(ChecksumError, match="not a"):
        verify_digests("f", {}, "damaged")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        verify_digests("f", {"a": "1"}, None)
    assert [w.category for w in caught] == [MissingChecksumWarning]
