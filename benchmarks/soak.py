"""Soak test: the toy GRPO run (examples/toy_pathology.py --stage grpo) killed and resumed, against
the same run never interrupted. A dense reward (`brevity`) joins the toy's format and accuracy
rewards, so that the weights move from the random tiny model.

    python benchmarks/soak.py                          # 200 steps, 5 SIGKILLs, then 5 SIGTERMs
    python benchmarks/soak.py --steps 60 --mode kill   # what fits a loaded 2-core machine

The run checkpoints every --save-steps and always resumes with resume_from_checkpoint="latest", as a
job script on a cluster would. Each kill targets a (step, phase) drawn at random, the phases taken in
turn: during the rollout, during the update, during a checkpoint save; the child announces each
phase on stdout and the kill comes a random few milliseconds into it. The phase it really landed in
is read back from the child's last announcement.

  kill   SIGKILL: nothing of the step survives; the run resumes from the last checkpoint and
         recomputes the steps after it (counted).
  term   SIGTERM: the run must finish the step, checkpoint and exit with EXIT_PREEMPTED (75); no
         step is recomputed.

Each kill is recorded with its target, the phase the process was in when it ended (`landed_in`;
after a SIGTERM that is "between phases": it finishes the step and its checkpoint first), its exit
status, and the steps it cost. Checked against the uninterrupted run: every metrics.jsonl record (but step_time, tokens_per_sec and
the stopped_by marker) and every weight of the final checkpoint identical. The uninterrupted run's
resident memory (VmRSS) is sampled through the run: from 10% of the steps to the end it must not grow
by more than RSS_GROWTH_BOUND_MB. Results: benchmarks/results/soak_<mode>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))

PHASES = ("rollout", "update", "save")
VOLATILE = {"step_time", "tokens_per_sec", "stopped_by"}
# A leak of a few hundred bytes per completion would pass this over a short run; a model copy, a
# kept batch or an unbounded log per step would not (the toy model is ~1 MB, a step's batch ~0.5 MB).
RSS_GROWTH_BOUND_MB = 25.0
EXIT_PREEMPTED = 75  # grpo.resilience.EXIT_PREEMPTED (not imported: the parent never loads torch)


def toy_arguments(args) -> list[str]:
    """The toy GRPO stage at the soak's size (a smaller data set than the demo's: quicker starts)."""
    return ["--stage", "grpo", "--max-steps", str(args.steps), "--prompts-per-step", str(args.prompts_per_step),
            "--max-completion-length", str(args.max_completion_length), "--sft-items", "100", "--rl-items", "64",
            "--test-items", "2", "--seed", str(args.seed)]


def brevity(prompts, completions, **columns):
    """A dense reward added to the toy's format and accuracy rewards: from the random tiny model those
    are 0 for every completion, and no weight would move (the comparison would be vacuous)."""
    return [-len(completion) / 100 for completion in completions]


# ---------------------------------------------------------------- the child: one training process


def run_child(output_dir: str, toy_args: list[str], save_steps: int) -> None:
    """The toy GRPO stage resuming from "latest", announcing each phase on stdout."""
    import torch

    import toy_pathology
    from grpo import Trainer
    from grpo.resilience import RunGuard
    from grpo.checkpoints import resolve_checkpoint
    from rewards import accuracy_reward, format_reward

    torch.set_num_threads(1)
    args = toy_pathology.parse_args(toy_args)
    sft_rows, rl_rows, _ = toy_pathology.build_data(args)
    model, processor = toy_pathology.build_model(args, sft_rows)
    cfg = toy_pathology.grpo_config(args, output_dir, args.max_steps)
    cfg.save_steps, cfg.resume_from_checkpoint = save_steps, "latest"

    def say(*words):
        print(*words, flush=True)

    def announced(name, method):
        def wrapper(self, *a, **k):
            step = self.step + (name != "save")  # rollout and update belong to the step being made
            say("start", name, step)
            result = method(self, *a, **k)
            say("end", name, step)
            return result
        return wrapper

    Trainer.rollout = announced("rollout", Trainer.rollout)
    Trainer.update = announced("update", Trainer.update)
    Trainer.save = announced("save", Trainer.save)
    finish_step = RunGuard.finish_step

    def finish_and_announce(self, step, checkpoint, save):
        say("done", step)
        return finish_step(self, step, checkpoint, save)

    RunGuard.finish_step = finish_and_announce
    trainer = Trainer(model, processor, [format_reward, accuracy_reward, brevity], rl_rows, cfg)
    latest = resolve_checkpoint("latest", output_dir)
    say("resume", int(latest.rsplit("-", 1)[1]) if latest else 0)
    trainer.train()


# ---------------------------------------------------------------- the parent


class Child:
    """One training process: its stdout lines as they come, and its resident memory."""

    def __init__(self, output_dir: str, args, log):
        command = [sys.executable, os.path.abspath(__file__), "--child", output_dir, "--save-steps", str(args.save_steps),
                   "--", *toy_arguments(args)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=ROOT)
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[list[str]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.put(line.split())
        self.lines.put(None)

    def next_line(self, timeout: float):
        """The next announcement (a list of words), None at the end of output, False on timeout."""
        try:
            words = self.lines.get(timeout=timeout)
        except queue.Empty:
            return False
        if words:
            self.seen.append(words)
        return words

    def rss_mb(self) -> float | None:
        try:
            with open(f"/proc/{self.process.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def drain(self) -> int:
        """Wait for the process to end, reading the rest of its announcements; its exit status."""
        status = self.process.wait()
        while self.next_line(timeout=5) not in (None, False):
            pass
        return status

    def last(self, kind: str) -> list[str] | None:
        return next((w for w in reversed(self.seen) if w[0] == kind), None)


def uninterrupted(output_dir: str, args, log) -> dict:
    """The reference run, with its resident memory sampled against the step reached."""
    child, samples, step, t0 = Child(output_dir, args, log), [], 0, time.time()
    while True:
        words = child.next_line(timeout=0.25)
        if words is None:
            break
        if words and words[0] == "done":
            step = int(words[1])
        rss = child.rss_mb()
        if rss is not None:
            samples.append((step, rss))
    status = child.drain()
    if status != 0:
        raise SystemExit(f"the uninterrupted run failed (status {status}); see {log.name}")
    warm = max(args.steps // 10, 2 * args.save_steps)  # past the first saves and the allocator's warm-up
    after_warmup = [rss for s, rss in samples if s >= warm]
    return {"seconds": round(time.time() - t0, 1), "rss_from_step": warm, "rss_mb_start": round(after_warmup[0], 1),
            "rss_mb_end": round(after_warmup[-1], 1), "rss_mb_max": round(max(after_warmup), 1),
            "rss_growth_mb": round(after_warmup[-1] - after_warmup[0], 1),
            "rss_mb_by_step": {s: round(rss, 1) for s, rss in samples if s % max(1, args.steps // 20) == 0}}


def plan(args, rng: random.Random) -> list[tuple[int, str]]:
    """K (step, phase) targets, steps increasing, phases in turn; saves only fall on save steps."""
    targets, step = [], 0
    for k in range(args.kills):
        phase = PHASES[k % len(PHASES)]
        span = args.steps // args.kills  # one target per stretch of the run
        low, high = max(step + 1, k * span + 1), max(step + 1, (k + 1) * span)
        if phase == "save":
            choices = [s for s in range(low, high + 1) if s % args.save_steps == 0] or \
                      [s for s in range(low, args.steps + 1) if s % args.save_steps == 0]
        else:
            choices = list(range(low, high + 1))
        step = rng.choice(choices)
        targets.append((step, phase))
    return targets


def interrupted(output_dir: str, args, log, mode: str, rng: random.Random) -> dict:
    """The run with its kills: each one at a planned (step, phase), then resumed; the last segment
    runs to the end."""
    sig = signal.SIGKILL if mode == "kill" else signal.SIGTERM
    segments, t0 = [], time.time()
    for target in plan(args, rng) + [None]:
        child = Child(output_dir, args, log)
        while target is not None:
            words = child.next_line(timeout=600)
            if not words:
                raise SystemExit(f"the run ended before its kill at {target}; see {log.name}")
            if words[:3] == ["start", target[1], str(target[0])]:
                time.sleep(rng.uniform(0.0, args.max_delay))
                child.process.send_signal(sig)
                break
        status = child.drain()
        started, ended, done = child.last("start"), child.last("end"), child.last("done")
        landed = started[1] if started and (not ended or ended[1:] != started[1:]) else "between phases"
        segments.append({"target": f"{target[1]} of step {target[0]}" if target else None, "landed_in": landed,
                         "exit_status": status, "resumed_from": int(child.last("resume")[1]),
                         "steps_done": int(done[1]) if done else None})
    last = segments.pop()
    if last["exit_status"] != 0:
        raise SystemExit(f"the last segment failed (status {last['exit_status']}); see {log.name}")
    # Recomputed: steps a segment finished that the next one did again.
    for kill, following in zip(segments, segments[1:] + [last]):
        kill["next_resumes_from"] = following["resumed_from"]
        kill["steps_recomputed"] = max(0, (kill["steps_done"] or 0) - following["resumed_from"])
    return {"seconds": round(time.time() - t0, 1), "kills": segments}


def _step(name: str) -> int:
    return int(name.rsplit("-", 1)[1])


def compare(reference: str, resumed: str) -> dict:
    """Every metrics record and every final weight equal? (And did training move the weights from
    the first checkpoint's at all, so that the comparison means something.)"""
    from safetensors.torch import load_file

    def records(folder):
        with open(os.path.join(folder, "metrics.jsonl")) as f:
            return [{k: v for k, v in json.loads(line).items() if k not in VOLATILE} for line in f if line.strip()]

    a, b = records(reference), records(resumed)
    differing = [x["step"] for x, y in zip(a, b) if x != y]
    names = [name for name in os.listdir(reference) if name.startswith("checkpoint-")]
    final = max(names, key=_step)
    wa, wb = (load_file(os.path.join(folder, final, "model.safetensors")) for folder in (reference, resumed))
    import torch

    different_weights = [k for k in wa if k not in wb or not torch.equal(wa[k], wb[k])]
    start = load_file(os.path.join(reference, sorted(names, key=_step)[0], "model.safetensors"))
    return {"tensors_trained_since_first_checkpoint": sum(not torch.equal(start[k], wa[k]) for k in wa), "steps_logged": [len(a), len(b)], "metrics_identical": len(a) == len(b) and not differing,
            "steps_with_different_metrics": differing[:10], "final_checkpoint": final,
            "weights_identical": not different_weights and wa.keys() == wb.keys(),
            "tensors_compared": len(wa), "different_tensors": different_weights[:10]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--mode", choices=["kill", "term", "both"], default="both")
    parser.add_argument("--save-steps", type=int, default=5)
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--max-completion-length", type=int, default=32)
    parser.add_argument("--max-delay", type=float, default=0.05, help="seconds into the phase the kill may come")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", default=None, help="where the runs go (default: a temporary directory, removed)")
    parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("toy", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return run_child(args.child, args.toy, args.save_steps)

    work = args.work_dir or tempfile.mkdtemp(prefix="soak-")
    os.makedirs(work, exist_ok=True)
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(work, "children.log"), "a") as log:
        reference = os.path.join(work, "uninterrupted")
        shutil.rmtree(reference, ignore_errors=True)
        print(f"uninterrupted run of {args.steps} steps ...", flush=True)
        memory = uninterrupted(reference, args, log)
        for mode in (["kill", "term"] if args.mode == "both" else [args.mode]):
            folder = os.path.join(work, mode)
            shutil.rmtree(folder, ignore_errors=True)
            print(f"{mode}: {args.kills} x {'SIGKILL' if mode == 'kill' else 'SIGTERM'} ...", flush=True)
            run = interrupted(folder, args, log, mode, random.Random(args.seed))
            result = {"mode": mode, "settings": {k: v for k, v in vars(args).items() if k not in ("child", "toy", "work")},
                      "toy_arguments": toy_arguments(args), "rewards": "format, accuracy, brevity", "uninterrupted": memory,
                      "rss_growth_bound_mb": RSS_GROWTH_BOUND_MB, **run, **compare(reference, folder)}
            result["kills_survived"] = len(run["kills"])
            result["steps_recomputed"] = sum(k["steps_recomputed"] for k in run["kills"])
            checks = {"metrics identical": result["metrics_identical"], "weights identical": result["weights_identical"],
                      f"RSS growth <= {RSS_GROWTH_BOUND_MB} MB": memory["rss_growth_mb"] <= RSS_GROWTH_BOUND_MB}
            if mode == "term":
                checks["every stop exited 75"] = all(k["exit_status"] == EXIT_PREEMPTED for k in run["kills"])
                checks["no step recomputed"] = result["steps_recomputed"] == 0
            result["checks"] = checks
            path = os.path.join(args.results, f"soak_{mode}.json")
            with open(path, "w") as f:
                json.dump(result, f, indent=2)
            print(json.dumps({k: result[k] for k in ("kills_survived", "steps_recomputed", "checks")}, indent=2))
            print(f"-> {path}")
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
