"""The recipe's `data` section: where prompts come from, how the held-out set is chosen, and the
offline pairs (online_dpo/data/prompts.py reads them)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag

from online_dpo.config.base import Float, Int, Section, Str


class PromptSource(Section):
    """A prompt dataset as researchers name it, e.g.
    `{path: HuggingFaceH4/ultrafeedback_binarized, split: train_prefs, column: prompt}`."""

    path: Str
    """A local file (jsonl/json/parquet/csv), a `save_to_disk` folder, a folder of data files, or
    an HF dataset name (read from the HF datasets cache; downloaded only when HF_DATASETS_OFFLINE=0)."""
    split: Str | None = None
    """The split to read (e.g. train_prefs); None: `train`, or a file's only split."""
    config: Str | None = None
    """An HF dataset's configuration (subset) name."""
    revision: Str | None = None
    """An HF dataset's branch, tag or commit."""
    column: Str = "prompt"
    """The prompt column: a string, or a list of chat messages."""
    messages_column: Str | None = None
    """Instead of `column`: a column of chat messages (system prompt and earlier turns kept); turns
    after the last user turn (a recorded reply) are dropped."""
    where: dict[Str, Any] = Field(default_factory=dict)
    """Keep only rows whose column equals this value (or is one of a list of values), e.g.
    `{source: flan_v2}`."""


def _value_or_dataset(value: Any) -> str:
    return "<dataset>" if isinstance(value, (dict, PromptSource)) else "<value>"


def or_dataset(plain):
    """`plain` or a PromptSource mapping; an error names the key alone (the recipe loader drops
    the "<...>" tag from its location), as for any other key."""
    return Annotated[Annotated[plain, Tag("<value>")] | Annotated[PromptSource, Tag("<dataset>")],
                     Discriminator(_value_or_dataset)]


class DataConfig(Section):
    prompts: or_dataset(Str)
    """A jsonl/json/parquet/csv file (or save_to_disk folder) with a `prompt` column, or a dataset
    mapping (PromptSource: path, split, config, revision, column or messages_column, where)."""
    prompts_per_round: Int = Field(16, gt=0)
    """Mode fully_online: derived, train.micro_batch_pairs * train.grad_accum_steps."""
    eval_prompts: or_dataset(Annotated[Int, Field(ge=1)]) = 8
    """Held-out prompts scored after every evaluated round: a count held out of data.prompts
    (by data.eval_split), or a dataset mapping of their own (another dataset, or another split)."""
    eval_split: Literal["random", "tail"] = "random"
    """How a count of held-out prompts is chosen: a random sample seeded by data.split_seed (a
    source-ordered file would otherwise give a one-source held-out set), or the file's last rows."""
    split_seed: Int = 0
    """The held-out sample's seed: not the run's `seed`, so a sweep over seeds shares one held-out set."""
    pairs: Str | None = None
    """Mode offline only: a prompt/chosen/rejected dataset. Unset: pairs are sampled once from pi_0."""
    max_prompt_tokens: Int | None = Field(None, gt=0)
    """Prompts longer than this many tokens (chat template applied) are dropped at load and counted
    in runs/<name>/prompts.json, so none can overflow the sampler. None: generation.max_model_len
    minus generation.max_tokens; a larger value is refused."""
    max_dropped_share: Float = Field(0.1, ge=0, le=1)
    """Refuse the run when the prompt-length limit drops more than this share of the prompts."""
