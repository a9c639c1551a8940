"""Sample stories from a checkpoint of train.py: `python -m minijamba.sample --ckpt runs/jamba` (`make sample`).

    python -m minijamba.sample --ckpt runs/jamba --prompt "Once upon a time" --temperature 0.8 --top-k 50 --n 3

--ckpt is a run folder (its `latest` checkpoint) or one checkpoint folder. The model and its tokenizer load from it
(safetensors weights, tokenizer.json); the prompt is prefilled in parallel, then each new token is one step: O(1)
for the Mamba layers (their conv and SSM states), a read of the KV cache for the attention layers. A story ends at
the first `<|endoftext|>` or after --max-new-tokens. --seed fixes the draw: the same seed, the same stories.
"""

import argparse
import sys

import torch

from .train import load_run, sample_stories

__all__ = ["main"]


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
    if args.n < 1 or args.max_new_tokens < 1:
        parser.error(f"--n and --max-new-tokens must be >= 1, got {args.n} and {args.max_new_tokens}")
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
