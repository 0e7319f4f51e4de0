"""Hugging Face's Trainer with the remat backend. The Trainer passes remat no options:
they come from the environment (``remat.env_options``):

    REMAT_OPTIONS='{"memory_budget": "8MiB", "inner_compiler": "eager"}' python examples/hf_trainer.py
"""

from __future__ import annotations

import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import remat  # adds "remat" to accelerate's list of backends: import it before making the Trainer

SMALL = {"max_steps": 2, "per_device_train_batch_size": 8, "learning_rate": 1e-3, "use_cpu": True,
         "report_to": "none", "save_strategy": "no", "seed": 0}


def tiny_gpt2() -> tuple[GPT2LMHeadModel, list[dict[str, torch.Tensor]]]:
    """A small randomly initialized GPT-2 without dropout, and 16 sequences to learn."""
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=32, bos_token_id=0,
                        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    data = [{"input_ids": tokens, "labels": tokens} for tokens in torch.randint(0, 128, (16, 32))]
    return GPT2LMHeadModel(config), data


def main(output_dir: str | None = None) -> GPT2LMHeadModel:
    model, data = tiny_gpt2()
    output_dir = output_dir or tempfile.mkdtemp(prefix="hf-trainer-")  # the Trainer's logs; nothing is saved
    args = TrainingArguments(output_dir, torch_compile=True, torch_compile_backend="remat", **SMALL)
    Trainer(model=model, args=args, train_dataset=data).train()
    return model


if __name__ == "__main__":
    print(remat.explain(main()))
