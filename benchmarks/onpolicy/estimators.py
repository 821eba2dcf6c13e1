"""The estimators of on-policy distillation against the exact reverse KL, at the byte vocabulary
(V = 256, where the exact value over the whole vocabulary is cheap).

    python benchmarks/onpolicy/estimators.py --work /tmp/onpolicy   # after onpolicy.py's teacher and O2 runs

On the states a student visits (its own continuations, temperature 1, of 64 test prompts of 16
bytes: about 3,000 states), per state:
- exact: KL(p_s || p_t) over the 256 bytes, and its gradient wrt the student's logits,
  p_s * (log p_s - log p_t - KL);
- 'topk+tail' (distill.logits topk, k = 8, with onpolicy.estimator divergence): the reverse KL
  between the teacher's top-8 plus a tail bucket and the student folded to the same 9 buckets;
  deterministic, so its error is all bias;
- 'policy_gradient' (onpolicy.estimator policy_gradient, dense teacher): one draw a ~ p_s, the
  value log p_s(a) - log p_t(a) and the gradient (that value) x (onehot(a) - p_s); unbiased, so
  its error is spread: measured over 64 draws per state;
- 'policy_gradient, top-8 teacher': the same with the teacher's log p(a) read from its top 8 and
  the tail spread evenly (what a compressed teacher gives it): biased where a falls in the tail.
Reported: the value's bias (mean of estimate - exact, nats per token) and spread (std over
draws), the gradient's relative error ||mean estimate - exact|| / ||exact|| (over the 64 draws:
what an average of many tokens approaches) and the cosine of one draw's gradient with the exact one.
"""
from __future__ import annotations

import argparse
import os
import sys

import pandas as pd
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
from online_distill.distill.losses import DenseTarget  # noqa: E402
from online_distill.distill.sparse import compress  # noqa: E402
from online_distill.models.generate import Sampling, generate  # noqa: E402
from online_distill.run.export import load_trained  # noqa: E402


def states(student, teacher, data, prompts: int = 64, prompt_len: int = 16):
    """Student and teacher logits (N, V) at every state of the student's own continuations."""
    x = data.test.x[:prompts, :-1].long()
    out = generate(student, x[:, :prompt_len], None, Sampling(max_new_tokens=48), seed=0)
    with torch.no_grad():
        z_s, z_t = student(out.tokens).float(), teacher(out.tokens).float()
    pos = torch.arange(out.tokens.shape[1]).unsqueeze(0)
    mask = (pos >= prompt_len - 1) & (pos < (out.lengths - 1).unsqueeze(1))
    return z_s[mask], z_t[mask]


def measure(z_s: torch.Tensor, z_t: torch.Tensor, draws: int = 64, k: int = 8) -> pd.DataFrame:
    log_s, log_t = F.log_softmax(z_s, -1), F.log_softmax(z_t, -1)
    p_s = log_s.exp()
    exact = (p_s * (log_s - log_t)).sum(-1)
    g_exact = p_s * (log_s - log_t - exact.unsqueeze(-1))
    rows = []

    def row(name, value_bias, value_spread, g_mean, g_one):
        rel = ((g_mean - g_exact).norm(dim=-1) / g_exact.norm(dim=-1).clamp_min(1e-12)).mean()
        cos = F.cosine_similarity(g_one, g_exact, dim=-1).mean()
        rows.append({"estimator": name, "states": len(z_s), "exact_reverse_kl": round(float(exact.mean()), 4),
                     "value_bias": round(float(value_bias), 4), "value_spread": round(float(value_spread), 4),
                     "grad_rel_error": round(float(rel), 4), "grad_cosine_one_draw": round(float(cos), 4)})

    # top-k + tail bucket, reverse KL through the folded distributions (autograd for the gradient)
    target = compress(z_t, temperature=1.0, kind="topk", k=k)
    zs = z_s.clone().requires_grad_(True)
    v = target.per_position(zs, temperature=1.0, divergence="reverse_kl")
    g = torch.autograd.grad(v.sum(), zs)[0]
    row(f"topk{k}+tail (divergence)", (v.detach() - exact).mean(), 0.0, g, g)

    # the policy gradient, one draw a ~ p_s per state, `draws` times; teacher dense or its top-k
    g_gen = torch.Generator().manual_seed(0)
    a = torch.multinomial(p_s, draws, replacement=True, generator=g_gen)  # (N, draws)
    for name, log_t_of in (("policy_gradient (dense teacher)", lambda t: DenseTarget(z_t.unsqueeze(0)).token_log_prob(t, temperature=1.0)),
                           (f"policy_gradient (top{k} teacher)", lambda t: target.token_log_prob(t, temperature=1.0))):
        values, grads = [], []
        for d in range(draws):
            t = a[:, d]
            ratio = log_s.gather(-1, t[:, None])[:, 0] - log_t_of(t)
            values.append(ratio)
            grads.append(ratio.unsqueeze(-1) * (F.one_hot(t, z_s.shape[-1]).float() - p_s))
        values, grads = torch.stack(values), torch.stack(grads)
        row(name, (values.mean(0) - exact).mean(), values.std(0).mean(), grads.mean(0), grads[0])
    return pd.DataFrame(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/onpolicy")
    ap.add_argument("--teacher", default="fortunes_teacher-s0")
    ap.add_argument("--student", default="l0_b0.5-s0", help="a run of O2 (the off-policy student: its own states)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    _, _, teacher, data = load_trained(os.path.join(args.work, "runs", args.teacher), 0)
    _, _, student, _ = load_trained(os.path.join(args.work, "runs", args.student), 0)
    z_s, z_t = states(student, teacher, data)
    table = measure(z_s, z_t)
    table.insert(0, "student", args.student)
    table.to_csv(os.path.join(HERE, "estimators.csv"), index=False)
    print(table.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
