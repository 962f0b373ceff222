"""What transformers gives a multiple-choice task's endings: each one's mean log-probability of
its tokens after those all share, the first of them after the last shared token (llama-perplexity's
--hellaswag / --multiple-choice score), for test_hellaswag.py and test_multiple_choice.py."""

from __future__ import annotations

import torch


def reference_means(model, reference, context: str, endings) -> list[float]:
    """`model` tokenizes ("context ending", whole), `reference` (a transformers model) scores."""
    seqs = [model.tokenizer.encode(f"{context} {e}", add_special_tokens=False).ids for e in endings]
    common = next(i for i in range(min(map(len, seqs))) if len({s[i] for s in seqs}) > 1)
    means = []
    for s in seqs:
        with torch.no_grad():
            lp = torch.log_softmax(reference(input_ids=torch.tensor([s])).logits[0].double(), -1)
        means.append(float(lp[torch.arange(common - 1, len(s) - 1), torch.tensor(s[common:])].mean()))
    return means
