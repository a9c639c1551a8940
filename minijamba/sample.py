"""Sample stories from a checkpoint of train.py: `python -m minijamba.sample --ckpt runs/jamba` (`make sample`).

    python -m minijamba.sample --ckpt runs/jamba --prompt "Once upon a time" --temperature 0.8 --top-k 50 --n 3

--ckpt is a run folder (its `latest` checkpoint) or one checkpoint folder. The model and its tokenizer load from it
(safetensors weights, tokenizer.json); the prompt is prefilled in parallel, then each new token is one step: O(1)
for the Mamba layers (their conv and SSM states), a read of the KV cache for the attention layers. A story ends at
the first `<|endoftext|>` or after --max-new-tokens. --seed fixes the draw: the same seed, the same stories.

Reading a run back needs nothing of the training loop, so this module does not import train.py (train.py imports
these from here):
    checkpoint_dir   the checkpoint folder a path names: itself, or the one a run folder's `latest` names
    load_run         (model, tokenizer, TrainConfig) from a checkpoint or run folder
    sample_stories   n stories continuing a prompt, cut at the first end-of-text token
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from . import data
from .checks import positive_int
from .models import load_pretrained
from .train_config import TrainConfig

__all__ = ["checkpoint_dir", "load_run", "sample_stories", "main"]


def checkpoint_dir(path):
    """The checkpoint folder: `path` itself, or the one a run folder's `latest` names."""
    path = Path(path)
    if (path / "latest").is_file():
        return path / (path / "latest").read_text().strip()
    if (path / "config.json").is_file():
        return path
    raise FileNotFoundError(f"{str(path)!r} is neither a checkpoint folder nor a run folder with a 'latest' file")


def load_run(path, device="cpu"):
    """(model, tokenizer, TrainConfig) from a checkpoint or run folder; safetensors weights, weights_only state."""
    ckpt = checkpoint_dir(path)
    cfg = TrainConfig(**json.loads((ckpt / "train_config.json").read_text()))
    return load_pretrained(ckpt, device=device), data.load_tokenizer(ckpt), cfg


def sample_stories(
    model, tokenizer, prompt="Once upon a time", n=3, max_new_tokens=200, temperature=0.8, top_k=50, seed=0
):
    """n stories continuing `prompt`: prefill + O(1) Mamba steps (KV cache for attention), cut at the first EOT."""
    device = next(model.parameters()).device
    ids = torch.tensor([tokenizer.encode(prompt).ids] * n, device=device)  # (n, prompt length)
    was_training = model.training
    model.eval()
    out = model.generate(ids, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)  # (n, L + new)
    model.train(was_training)
    texts = [tokenizer.decode(row.tolist(), skip_special_tokens=False) for row in out]
    return [text.split(data.EOT)[0].strip() for text in texts]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="a run folder of train.py (uses its latest checkpoint)")
    parser.add_argument("--prompt", default="Once upon a time")
    parser.add_argument("--n", type=int, default=3, help="how many stories")
    parser.add_argument("--max-new-tokens", type=int, default=300)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (argmax)")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        positive_int("--n", args.n)
        positive_int("--max-new-tokens", args.max_new_tokens)
    except ValueError as e:
        parser.error(str(e))
    try:
        model, tokenizer, cfg = load_run(args.ckpt, device=args.device)
        stories = sample_stories(
            model, tokenizer, args.prompt, args.n, args.max_new_tokens, args.temperature, args.top_k, args.seed
        )
    except (FileNotFoundError, ValueError) as e:  # CheckpointError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{cfg.model} from {args.ckpt} (temperature {args.temperature}, top-k {args.top_k}, seed {args.seed})")
    for i, story in enumerate(stories, 1):
        print(f"\n--- story {i} ---\n{story}")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
