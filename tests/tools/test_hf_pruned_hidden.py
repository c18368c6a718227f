"""A hidden width that is not a multiple of the heads (hidden pruning with head_dim fixed) exports
to a folder transformers 5 loads: its Llama config refuses that width even with head_dim given, so
the export uses our remote-code class (found on SmolLM2-135M pruned to half: hidden 480, 9 heads)."""

import json
import os
import shutil

import torch

from pretrain.config import ModelConfig


def test_hidden_not_a_multiple_of_the_heads_exports_and_loads(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from pretrain.interop.hf import REMOTE_CODE as _REMOTE_CODE, hf_config_dict

    model = ModelConfig(num_layers=2, hidden_size=40, num_attention_heads=3, num_query_groups=1,
                        ffn_hidden_size=64, kv_channels=16, seq_length=32)
    config = hf_config_dict(model, 100, {}, torch.float32)
    assert config["model_type"] == "pruned_llama" and config["hidden_size"] == 40 and config["head_dim"] == 16
    assert config["layer_shapes"] is None  # uniform: the remote class with the model's own widths
    json.dump(config, open(tmp_path / "config.json", "w"))
    for file in os.listdir(_REMOTE_CODE):
        if file.endswith(".py"):
            shutil.copyfile(os.path.join(_REMOTE_CODE, file), tmp_path / file)
    loaded = AutoConfig.from_pretrained(str(tmp_path), trust_remote_code=True)
    hf = AutoModelForCausalLM.from_config(loaded, trust_remote_code=True).eval()
    assert hf.model.layers[0].self_attn.o_proj.weight.shape == (40, 3 * 16)
    assert hf(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 100)
