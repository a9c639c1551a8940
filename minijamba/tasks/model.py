"""TaskModel: the tiny token models of the synthetic tasks, in Table 1's two architectures (with S6 or its LTI twin)."""

from torch import nn

from minijamba.checkpoint import CheckpointError, check_tensors, load_config, load_tensors, save_checkpoint
from minijamba.checks import positive_int
from minijamba.lm import CausalLMOutput
from minijamba.mamba import MambaBlock, MambaConfig
from minijamba.s6 import SelectiveSSM, auto_dt_rank


class _Block(nn.Module):
    """Pre-norm residual block of the paper's "(no gate)" rows: x + out_proj(ssm(in_proj(norm(x))))."""

    def __init__(self, d_model, d_inner, d_state, selective, scan_impl):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.in_proj = nn.Linear(d_model, d_inner)
        dt_rank = auto_dt_rank(d_model)  # R as a Mamba block of this width has it
        self.ssm = SelectiveSSM(d_inner, d_state, dt_rank, selective=selective, scan_impl=scan_impl)
        self.out_proj = nn.Linear(d_inner, d_model)

    def forward(self, hidden):  # hidden: (batch, L, d_model)
        u = self.in_proj(self.norm(hidden)).transpose(1, 2)  # (batch, d_inner, L): the SSM's input
        return hidden + self.out_proj(self.ssm(u).transpose(1, 2))  # (batch, L, d_model)


BLOCKS = ("plain", "mamba")  # Table 1's two architectures: "(no gate)" blocks, and the Mamba block
CONFIG_KEYS = ("vocab", "d_model", "n_layers", "d_state", "selective", "expand", "block")  # the constructor's


class TaskModel(nn.Module):
    """A tiny token model for the synthetic tasks: (batch, L) token ids -> (batch, L, vocab) logits.

    block="plain": the paper's "(no gate)" rows, each block norm -> Linear -> SSM -> Linear. block="mamba": the
    Mamba block (mamba.py's MambaBlock: in_proj to u and the gate z, causal conv, SiLU, SSM, y·SiLU(z), out_proj).
    selective=False swaps every S6 for its LTI twin (fixed Δ, B, C): the S4 rows of Table 1.
    """

    def __init__(
        self, vocab, d_model=32, n_layers=2, d_state=16, selective=True, expand=2, scan_impl="chunked", block="plain"
    ):
        super().__init__()
        for name, value in (("vocab", vocab), ("d_model", d_model), ("n_layers", n_layers), ("expand", expand)):
            positive_int(name, value)
        if block not in BLOCKS:
            raise ValueError(f"block must be one of {BLOCKS}, got {block!r}")
        values = (vocab, d_model, n_layers, d_state, selective, expand, block)
        self.config = dict(zip(CONFIG_KEYS, values, strict=True))  # what save_pretrained writes to config.json
        self.embedding = nn.Embedding(vocab, d_model)
        if block == "plain":
            blocks = (_Block(d_model, expand * d_model, d_state, selective, scan_impl) for _ in range(n_layers))
        else:
            mamba = MambaConfig(d_model, n_layers, vocab, d_state, expand=expand, scan_impl=scan_impl)
            blocks = (_MambaTaskBlock(mamba, selective) for _ in range(n_layers))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens):
        """tokens (batch, L) -> CausalLMOutput, as the LMs return: logits (batch, L, vocab), no aux loss, no routers."""
        x = self.embedding(tokens)  # (batch, L, d_model)
        for block in self.blocks:
            x = block(x)  # (batch, L, d_model)
        logits = self.head(self.norm(x))  # (batch, L, vocab)
        return CausalLMOutput(logits, logits.new_zeros(()), ())

    def save_pretrained(self, directory):
        """config.json (the constructor's arguments) and model.safetensors, written atomically (checkpoint.py)."""
        save_checkpoint(directory, self.config, {k: v.detach() for k, v in self.state_dict().items()})

    @classmethod
    def from_pretrained(cls, directory, scan_impl="chunked"):
        """The model save_pretrained wrote, in eval mode; scan_impl as in the constructor (not stored)."""
        config = load_config(directory)
        if not isinstance(config, dict) or set(config) != set(CONFIG_KEYS):
            raise CheckpointError(f"{directory}/config.json: expected a TaskModel's keys {sorted(CONFIG_KEYS)}")
        try:
            model = cls(**config, scan_impl=scan_impl)
        except ValueError as e:
            raise CheckpointError(f"{directory}/config.json: {e}") from e
        tensors = load_tensors(directory)
        check_tensors(tensors, {k: tuple(v.shape) for k, v in model.state_dict().items()}, directory)
        model.load_state_dict(tensors)
        return model.eval()


class _MambaTaskBlock(MambaBlock):
    """MambaBlock with TaskModel's block interface: hidden (batch, L, d_model) -> hidden, no state kept."""

    def __init__(self, config, selective):
        super().__init__(config, selective=selective)

    def forward(self, hidden):
        return super().forward(hidden)[0]
