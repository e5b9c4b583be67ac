"""Stage 3 of the toy demo, the paper's R1: GRPO from Beta with format + accuracy + the judge reward.

The judge is examples/toy_judge_server.py on a free loopback port, reached through the same
`rewards.JudgeReward` a user points at OpenAI, Azure or vLLM.
"""

from __future__ import annotations

import copy
import os
import statistics

from grpo import GRPOConfig, Trainer
from rewards import JudgeReward, accuracy_reward, format_reward
from toy_judge_server import ToyJudgeServer

COUNTERS = ("requests", "retries", "failures", "parse_errors", "fallbacks", "cache_hits", "prompt_tokens",
            "completion_tokens")


def start_toy_judge() -> tuple[ToyJudgeServer, JudgeReward]:
    """The toy judge server (started; call .stop()) and a JudgeReward pointed at it."""
    server = ToyJudgeServer().start()
    # api_key="": the loopback judge needs none, and an OPENAI_API_KEY in the environment must not be sent.
    judge = JudgeReward(server.base_url, "toy-judge", api_key="", timeout=10.0, max_retries=3, max_concurrency=8)
    return server, judge


def train_r1(beta_model, processor, rl_rows, eval_rows, judge: JudgeReward, scorers, config: GRPOConfig):
    """GRPO from the Beta model with format + accuracy + judge rewards; returns (model, judge counters of the run)."""
    judge.stats()  # start from zero: earlier evaluations are not this stage's traffic
    trainer = Trainer(copy.deepcopy(beta_model), processor, [format_reward, accuracy_reward, judge], rl_rows, config,
                      eval_dataset=eval_rows, eval_reward_funcs=scorers)
    history = trainer.train()
    return trainer.model, judge_counters(history)


def judge_counters(history: list[dict]) -> dict:
    """The judge's per-step stats summed over a run; latency as the median p50 and the worst p95 of the steps."""
    totals = {name: sum(record.get(f"judge/{name}") or 0 for record in history) for name in COUNTERS}
    p50 = [r["judge/latency_p50"] for r in history if r.get("judge/latency_p50") is not None]
    p95 = [r["judge/latency_p95"] for r in history if r.get("judge/latency_p95") is not None]
    totals["latency_p50"] = statistics.median(p50) if p50 else None
    totals["latency_p95"] = max(p95) if p95 else None
    return totals


def print_counters(counters: dict, path: str | None = None) -> None:
    latency = (f", latency p50 {1000 * counters['latency_p50']:.0f} ms / p95 {1000 * counters['latency_p95']:.0f} ms"
               if counters.get("latency_p50") is not None else "")
    print("judge counters (stage 3): " + ", ".join(f"{name} {counters[name]}" for name in COUNTERS) + latency
          + (f" (per step in {os.path.join(path, 'metrics.jsonl')})" if path else ""))
