#!/usr/bin/env python3
"""Checks that a LoRA run's adapters load with PEFT onto the base language model.

Builds transformers' LlamaForCausalLM from the language-model tensors (`model.*`, `lm_head.*`) of
BASE/model.safetensors (the FILA checkpoint the run started from), puts FINAL/adapter.safetensors
and adapter_config.json on it with `peft.PeftModel.from_pretrained`, and compares its logits on a
fixed prompt with the language model of FINAL/model.safetensors (the merged export). Exits 1 when
they differ by more than 1e-4.

    python3 scripts/peft_check.py checkpoints/synth-lora-stage2/final checkpoints/synth-stage1/final

Needs `pip install torch transformers peft safetensors`.
"""
import json
import shutil
import sys
import tempfile

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM


def language_model(config, path):
    tensors = {k: v for k, v in load_file(path).items() if k.startswith(("model.", "lm_head."))}
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or any("rotary" not in k for k in missing):
        sys.exit(f"{path}: not a FILA language model (missing {missing}, unexpected {unexpected})")
    return model.eval()


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    final, base = sys.argv[1], sys.argv[2]
    c = json.load(open(f"{final}/config.json"))["llm"]
    config = LlamaConfig(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
                         num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
                         num_key_value_heads=c["num_key_value_heads"], head_dim=c["head_dim"],
                         max_position_embeddings=c["max_position_embeddings"], rms_norm_eps=c["rms_norm_eps"],
                         rope_theta=c["rope_theta"], tie_word_embeddings=c["tie_word_embeddings"])
    adapter_dir = tempfile.mkdtemp()
    shutil.copy(f"{final}/adapter.safetensors", f"{adapter_dir}/adapter_model.safetensors")
    shutil.copy(f"{final}/adapter_config.json", f"{adapter_dir}/adapter_config.json")
    with_peft = PeftModel.from_pretrained(language_model(config, f"{base}/model.safetensors"), adapter_dir).eval()
    merged = language_model(config, f"{final}/model.safetensors")
    base_only = language_model(config, f"{base}/model.safetensors")
    ids = torch.tensor([[1, 17, 30, 5, 9, 44, 2, 12, 100, 200]]) % c["vocab_size"]
    with torch.no_grad():
        a, b, plain = with_peft(input_ids=ids).logits, merged(input_ids=ids).logits, base_only(input_ids=ids).logits
    diff, change = (a - b).abs().max().item(), (b - plain).abs().max().item()
    print(f"PEFT adapters on the base vs the merged export: max |logit diff| {diff:.2e} (the adapters change the logits by up to {change:.2e})")
    sys.exit(0 if diff <= 1e-4 else 1)


if __name__ == "__main__":
    main()
