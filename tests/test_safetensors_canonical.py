"""lora_metadata.canonicalize_safetensors: safetensors 0.8 writes a two-key metadata map in a random order per
save, so the same LoRA gave two different files; canonicalized, every save is one byte string."""

from __future__ import annotations

import hashlib

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from rewardtune.lora_metadata import canonicalize_safetensors

TENSORS = {"unet.a.lora_A.weight": torch.arange(12.0).reshape(3, 4), "unet.a.lora_B.weight": torch.ones(4, 3)}
META = {"format": "pt", "lora_adapter_metadata": '{"unet.r": 4, "unet.lora_alpha": 8.0, "unet.note": "\\u00e9\\n"}'}


def test_every_save_is_one_byte_string_after_canonicalizing(tmp_path):
    canonical = set()
    for i in range(40):
        path = tmp_path / f"f{i}.safetensors"
        save_file(TENSORS, str(path), metadata=META)
        canonicalize_safetensors(path)
        canonical.add(hashlib.sha256(path.read_bytes()).hexdigest())
        loaded = load_file(str(path))
        assert all(torch.equal(loaded[k], v) for k, v in TENSORS.items())
        with safe_open(str(path), "pt") as f:
            assert f.metadata() == META
    assert len(canonical) == 1  # without canonicalizing, safetensors 0.8 gave both orders here (len(raw) == 2)


def test_a_single_key_file_is_left_untouched(tmp_path):
    path = tmp_path / "one.safetensors"
    save_file(TENSORS, str(path), metadata={"format": "pt"})
    before = path.read_bytes()
    canonicalize_safetensors(path)
    assert path.read_bytes() == before
