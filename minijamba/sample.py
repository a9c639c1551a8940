"""Sample stories from a checkpoint of train.py: `python -m minijamba.sample --ckpt runs/jamba` (`make sample`).

    python -m minijamba.sample --ckpt runs/jamba --prompt "Once upon a time" --temperature 0.8 --top-k 50 --n 3

--ckpt is a run folder (its `latest` checkpoint) or one checkpoint folder. The model and its tokenizer load from it
(safetensors weights, tokenizer.json); the prompt is prefilled in parallel, then each new token is one step: O(1)
for the Mamba layers (their conv and SSM states), a read of the KV cache for the attention layers. A story ends at
the first `<|endoftext|>` or after --max-new-tokens. --seed fixes the draw: the same seed, the same stories.
A story's control characters (but newline and tab) are printed escaped, `\\x1b` and the like: a model's bytes must
not drive the terminal. Every bad flag, and a damaged or mismatched checkpoint, is one `error:` line and exit 1.

A run that is training now can be read: `latest` is replaced atomically by train.py, so one read gives a whole
name, and a checkpoint deleted under the reader (the trainer saved a newer one) is read again, once, from the
checkpoint `latest` names then.

Reading a run back needs nothing of the training loop, so this module does not import train.py (train.py imports
these from here):
    checkpoint_dir   the checkpoint folder a path names: itself, or the one a run folder's `latest` names
    load_run         (model, tokenizer, TrainConfig) from a checkpoint or run folder
    sample_stories   n stories continuing a prompt, cut at the first end-of-text token
    printable        text with its control characters escaped, for a terminal
"""

import argparse
import sys
import unicodedata
from pathlib import Path

import torch

from . import data
from .checks import positive_int
from .generation import check_max_new_tokens, check_seed, check_temperature
from .models import load_pretrained
from .train_config import TrainConfig, resolve_device

__all__ = ["checkpoint_dir", "load_run", "sample_stories", "printable", "main"]


def checkpoint_dir(path):
    """The checkpoint folder: `path` itself, or the one a run folder's `latest` names (one folder in the run)."""
    path = Path(path)
    latest = path / "latest"
    if latest.is_file():
        name = latest.read_text(encoding="utf-8", errors="replace").strip()  # one read: train.py replaces it whole
        if not name or name in (".", "..") or Path(name).name != name:
            raise ValueError(f"{latest} must name a checkpoint folder of the run, got {name!r}: the run is damaged")
        if not (path / name).is_dir():
            raise FileNotFoundError(f"{latest} names {name!r}, which is not in {str(path)!r}: the run is damaged")
        return path / name
    if (path / "config.json").is_file():
        return path
    raise FileNotFoundError(f"{str(path)!r} is neither a checkpoint folder nor a run folder with a 'latest' file")


def _load_checkpoint(ckpt, device):
    cfg = TrainConfig.from_json(ckpt / "train_config.json")
    model = load_pretrained(ckpt, device=device)
    tokenizer = data.load_tokenizer(ckpt)
    vocab, known = model.embed_tokens.num_embeddings, tokenizer.get_vocab_size()
    if known > vocab:  # its ids past the model's embedding would be an IndexError (a device assert on CUDA)
        raise ValueError(
            f"{ckpt / data.TOKENIZER_FILE} has {known} tokens, the model in {ckpt} {vocab}: the tokenizer is from "
            "another run; put back this run's tokenizer.json"
        )
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:  # every story would be a crash inside torch.multinomial, or argmax over NaN
        names = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise ValueError(f"{ckpt}: {names} hold NaN or inf (a diverged run): sample an earlier checkpoint")
    return model, tokenizer, cfg


def load_run(path, device="cpu"):
    """(model, tokenizer, TrainConfig) from a checkpoint or run folder; safetensors weights, weights_only state.

    A run folder's checkpoint that vanishes while it is read (the run is training and saved a newer one) is read
    once more, from the checkpoint `latest` names now; a damaged or mismatched checkpoint is a one-line error."""
    device = resolve_device(device)
    ckpt = checkpoint_dir(path)
    try:
        return _load_checkpoint(ckpt, device)
    except (OSError, ValueError):  # CheckpointError is a ValueError; a file deleted mid-read may show as either
        again = checkpoint_dir(path)
        if again == ckpt:  # `latest` did not move: the checkpoint itself is bad
            raise
        return _load_checkpoint(again, device)


def sample_stories(
    model, tokenizer, prompt="Once upon a time", n=3, max_new_tokens=200, temperature=0.8, top_k=50, seed=0
):
    """n stories continuing `prompt`: prefill + O(1) Mamba steps (KV cache for attention), cut at the first EOT."""
    device = next(model.parameters()).device
    prompt_ids = tokenizer.encode(prompt).ids
    if not prompt_ids:  # a byte-level BPE gives every non-empty text a token
        raise ValueError("the prompt (--prompt) is empty: give it the text the stories continue")
    ids = torch.tensor([prompt_ids] * n, device=device)  # (n, prompt length)
    was_training = model.training
    model.eval()
    out = model.generate(ids, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)  # (n, L + new)
    model.train(was_training)
    texts = [tokenizer.decode(row.tolist(), skip_special_tokens=False) for row in out]
    return [text.split(data.EOT)[0].strip() for text in texts]


def printable(text):
    """text with every control character but newline and tab (C0, DEL, C1) escaped as Python writes it (`\\x1b`):
    printed raw, a model's escape bytes could move the cursor, recolour or retitle the user's terminal."""
    return "".join(c if c in "\n\t" or unicodedata.category(c) != "Cc" else repr(c)[1:-1] for c in text)


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
        check_max_new_tokens("--max-new-tokens", positive_int("--max-new-tokens", args.max_new_tokens))
        check_temperature("--temperature", args.temperature)
        positive_int("--top-k", args.top_k)
        check_seed("--seed", args.seed)
        model, tokenizer, cfg = load_run(args.ckpt, device=args.device)
        stories = sample_stories(
            model, tokenizer, args.prompt, args.n, args.max_new_tokens, args.temperature, args.top_k, args.seed
        )
    except (OSError, ValueError) as e:  # CheckpointError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{cfg.model} from {args.ckpt} (temperature {args.temperature}, top-k {args.top_k}, seed {args.seed})")
    for i, story in enumerate(stories, 1):
        print(f"\n--- story {i} ---\n{printable(story)}")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
