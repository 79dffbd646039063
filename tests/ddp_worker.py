"""One DPO round on a tiny model, run by `torchrun` from tests/test_distributed.py.

Writes, per process, the pair indices it trained on, and (process 0) the final weights and
metrics, so the test can compare a 2-process run with a 1-process run on the same global batch.
"""

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from online_dpo.config.recipe import LossConfig, TrainConfig
from online_dpo.pipeline.objectives import Pair, PreferenceObjective
from online_dpo.training.trainer import DPOTrainer


class RecordingTrainer(DPOTrainer):
    seen: list[int] = []

    def _micro_step(self, objective, items, idx, reference, beta, weight):
        if weight:
            self.seen.extend(idx)
        return super()._micro_step(objective, items, idx, reference, beta, weight)


def main(model_dir: str, out: str, micro_pairs: int, accum: int) -> None:
    acc = Accelerator(cpu=True)
    gen = torch.Generator().manual_seed(0)
    pairs = [Pair(torch.randint(10, 400, (4,), generator=gen).tolist(),
                  torch.randint(10, 400, (3 + i % 5,), generator=gen).tolist(),
                  torch.randint(10, 400, (2 + i % 7,), generator=gen).tolist()) for i in range(16)]
    ref_c = -torch.rand(16, generator=gen) * 30
    ref_r = -torch.rand(16, generator=gen) * 30
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    train = TrainConfig(learning_rate=1e-3, micro_batch_pairs=micro_pairs, grad_accum_steps=accum)
    loss = LossConfig(beta=0.1)
    trainer = RecordingTrainer(model, loss, train, pad_id=2, accelerator=acc)
    metrics = trainer.train_round(PreferenceObjective(loss), pairs, torch.cat([ref_c, ref_r]), seed=3)
    out = Path(out)
    (out / f"seen_{acc.process_index}.json").write_text(json.dumps(trainer.seen))
    state = acc.unwrap_model(trainer.policy).state_dict()
    save_file({k: v.contiguous() for k, v in state.items() if k != "lm_head.weight"},
              out / f"weights_{acc.process_index}.safetensors")
    if acc.is_main_process:
        (out / "metrics.json").write_text(json.dumps({**metrics, "world": acc.num_processes}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
