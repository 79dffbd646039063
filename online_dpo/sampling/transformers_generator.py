"""A plain transformers `generate` backend. Slower than vLLM; chosen explicitly in a recipe."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import AutoModelForCausalLM

from online_dpo.sampling.generator import Completion, SamplingSettings
from online_dpo.training.losses import token_logps
from online_dpo.training.weight_stream import tied_names


class HFGenerator:
    def __init__(self, model_dir: str, dtype: torch.dtype, device: str, eos_token_ids: list[int],
                 pad_token_id: int, batch_size: int = 16):
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        self.device = device
        self.eos_token_ids = set(eos_token_ids)
        self.pad_token_id = pad_token_id
        self.batch_size = batch_size
        self.weight_version: str | None = None

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], settings: SamplingSettings) -> list[list[Completion]]:
        torch.manual_seed(settings.seed)
        results: list[list[Completion]] = []
        for start in range(0, len(prompt_ids), self.batch_size):
            results.extend(self._generate_batch(prompt_ids[start:start + self.batch_size], settings))
        return results

    def _generate_batch(self, batch: list[list[int]], settings: SamplingSettings) -> list[list[Completion]]:
        width = max(len(p) for p in batch)
        # Left padding keeps every prompt's last token at the same position.
        input_ids = torch.tensor([[self.pad_token_id] * (width - len(p)) + p for p in batch])
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        greedy = settings.temperature == 0
        out = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention.to(self.device),
            do_sample=not greedy,
            temperature=None if greedy else settings.temperature,
            top_p=None if greedy else settings.top_p,
            top_k=0,
            max_new_tokens=settings.max_tokens,
            num_return_sequences=settings.n,
            output_logits=True,  # raw logits, before temperature/top-p
            return_dict_in_generate=True,
            pad_token_id=self.pad_token_id,
            eos_token_id=sorted(self.eos_token_ids),
        )
        new_tokens = out.sequences[:, width:].cpu()
        logits = torch.stack(out.logits, dim=1).float()  # (B*n, steps, V)
        logps = torch.log_softmax(logits, dim=-1).gather(2, new_tokens.unsqueeze(-1).to(logits.device))
        logps = logps.squeeze(-1).cpu()
        completions = []
        for row in range(new_tokens.shape[0]):
            ids, lps, finished = [], [], False
            for tok, lp in zip(new_tokens[row].tolist(), logps[row].tolist()):
                ids.append(tok)
                lps.append(lp)
                if tok in self.eos_token_ids:
                    finished = True
                    break
            completions.append(Completion("", ids, lps, finished, self.weight_version))
        return [completions[i * settings.n:(i + 1) * settings.n] for i in range(len(batch))]

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Tensor by tensor, as the stream arrives; every name of the model must come but a tied
        one (lm_head = the embeddings), which holds the same tensor."""
        own = self.model.state_dict()
        missing = set(own) - tied_names(self.model)
        for name, tensor in named_tensors:
            if name not in own:
                raise KeyError(f"the sampler's model has no weight {name!r}")
            own[name].copy_(tensor)
            missing.discard(name)
        if missing:
            raise KeyError(f"the weight stream lacked {sorted(missing)[:3]} ({len(missing)} names)")
        self.weight_version = None

    def release(self) -> None:
        pass

    def label_weights(self, version: str) -> None:
        self.weight_version = version

    @torch.no_grad()
    def score(self, prompt_ids: list[int], completion_ids: list[int]) -> list[float]:
        ids = torch.tensor([prompt_ids + completion_ids], device=self.device)
        logits = self.model(input_ids=ids).logits
        return token_logps(logits, ids)[0, len(prompt_ids) - 1:].tolist()

    def close(self) -> None:
        self.model = None
