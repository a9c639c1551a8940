"""Synthetic tasks, class-sized: the Mamba paper's selective copying and induction heads, Zoology's multi-query
associative recall, the tiny models that learn them, a trainer, and the experiments of lessons 02, 05 and 09.

Gu & Dao 2023, §3.1 (Figure 2), §4.1 and Appendix E.1. Both of the paper's tasks need content-aware reasoning,
which an LTI model (S4: the same Δ, B, C at every step) cannot do, and a selective one (S6) can:
  - selective copying: remember a few data tokens scattered at random among noise and repeat them in order;
    where the data sit varies, so no fixed convolution kernel can pick them out.
  - induction heads: after seeing "... trigger a ...", answer a at the next trigger (associative recall).
Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology"): key-value pairs, then queries of some keys,
each to be answered with its key's value; Zoology found this kind of recall explains most (82%) of the perplexity
gap between attention and gated-convolution models on the Pile.

The files, one idea each:
  data.py         the batches: selective_copying, induction_heads, associative_recall
  model.py        TaskModel: Table 1's "(no gate)" blocks or the Mamba block, with S6 or its LTI twin
  training.py     train_task (AdamW, warmup + cosine, fresh batches, a fixed eval set), answer_accuracy
  lessons.py      the short experiments of lesson 02 (4 data tokens) and lesson 05 (associative recall)
  copying.py      Table 1 in its own setting: 16 data tokens, the table's four rows, several seeds
  induction.py    Table 2: induction heads trained at L 256, evaluated at lengths up to 2^16
  runs.py         what both experiments share: the JSONL log, the saved models, the printed table
  __main__.py     the command line

The two paper experiments run from the command line, print their table, write their JSONL log to lessons/logs/
and save every trained model (model.safetensors + config.json) under lessons/models/:

    python -m minijamba.tasks selective-copying            # Table 1: 4 rows x 3 seeds
    python -m minijamba.tasks induction-heads              # Table 2: Mamba, two attention baselines, the hybrid
    python -m minijamba.tasks evaluate lessons/models/09_induction_heads/mamba --lengths 17 18   # 2^17, 2^18

Loading a saved model is one line:

    TaskModel.from_pretrained("lessons/models/09_selective_copying/s6-mamba-seed0")     # a Table 1 model
    minijamba.models.load_pretrained("lessons/models/09_induction_heads/mamba", scan_impl="auto")   # a Table 2 LM

Threads: at these sizes the scan is thousands of tiny ops, so a second thread adds little, and when another
process holds one of the cores every op waits for the descheduled thread. On a shared machine,
torch.set_num_threads(1).
"""

from minijamba.tasks.data import IGNORE_INDEX, associative_recall, induction_heads, selective_copying
from minijamba.tasks.lessons import (
    LAYOUTS,
    AssociativeRecallConfig,
    SelectiveCopyingConfig,
    associative_recall_experiment,
    selective_copying_experiment,
)
from minijamba.tasks.model import BLOCKS, TaskModel
from minijamba.tasks.training import answer_accuracy, train_task

__all__ = [
    "IGNORE_INDEX",
    "selective_copying",
    "induction_heads",
    "associative_recall",
    "BLOCKS",
    "TaskModel",
    "answer_accuracy",
    "train_task",
    "SelectiveCopyingConfig",
    "selective_copying_experiment",
    "LAYOUTS",
    "AssociativeRecallConfig",
    "associative_recall_experiment",
]
