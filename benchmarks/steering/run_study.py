"""Multi-seed training study: does `thr_strategy` / `thr_p` change what a GRPO run learns?

For each seed and arm (GRPO, THR positive-amplify, THR negative-amplify, optionally dominant-only), train from the
same base checkpoint with `trl-thr train` on a training split, then evaluate on a held-out split with `trl-thr eval`
(greedy accuracy, unbiased Pass@K for K = 1..n). Every run writes `runs/<arm>-s<seed>/record.json` atomically; a
killed study resumes by skipping finished runs (and `trl-thr eval` resumes from its own generation cache).

    # CPU (2 cores): a 4-layer Qwen2 built here, first fine-tuned on the task's answer format
    python benchmarks/steering/run_study.py --output_dir benchmarks/steering/cpu --model scratch \
        --sft_steps 600 --steps 150 --seeds 0 1 2 --arms grpo positive-amplify negative-amplify dominant-only

    # GPU: the same study on a real model (no fine-tuning step), with longer runs
    python benchmarks/steering/run_study.py --output_dir results/steering-qwen --model Qwen/Qwen2.5-Math-1.5B \
        --sft_steps 0 --steps 500 --prompt_template qwen-math-boxed --max_completion_length 1024 --no-use_cpu

`--arms` order is the execution order within a seed; seeds run one after the other, so a study stopped early has
whole seeds of every arm. Several workers may share one `--output_dir` (e.g. one with `--seeds 0 1 2`, one with
`--seeds 2 1 0`): each run is claimed with a lock file. `summarize.py` turns the records into tables and plots.
"""

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from trl_thr.files import write_json_atomically, write_text_atomically

# Arms without a `:p` suffix; `strategy:p` (e.g. `amplify:-0.25`) gives any strategy its own p.
NAMED_ARMS = ("grpo", "positive-amplify", "negative-amplify", "amplify", "dominant-only", "nthr")
OPERATIONS = ("add", "sub", "mul")


def parse_arm(arm: str, default_p: float) -> tuple[str, float]:
    """`(thr_strategy, thr_p)` of an arm: `grpo` is `thr_strategy none`; a strategy name takes `--thr_p` (with the
    strategy's own sign rule, `trl_thr.thr.signed_p`); `strategy:p` takes `p` as written."""
    from trl_thr.thr import STRATEGIES, STRATEGIES_USING_P, signed_p

    name, _, written_p = arm.partition(":")
    strategy = "none" if name == "grpo" else name
    if strategy not in STRATEGIES:
        raise ValueError(f"arm {arm!r}: {name!r} is neither 'grpo' nor a thr_strategy {STRATEGIES}.")
    if not written_p:
        return strategy, signed_p(strategy, default_p)
    if strategy not in STRATEGIES_USING_P:
        raise ValueError(f"arm {arm!r}: {name!r} does not use p; write it without ':p'.")
    try:
        return strategy, float(written_p)
    except ValueError:
        raise ValueError(f"arm {arm!r}: {written_p!r} after ':' is not a number (e.g. amplify:-0.25).") from None


def run_name(arm: str, seed: int) -> str:
    """The directory and record name of one run, e.g. `amplify_p-0.25-s3` (no ':' in file names)."""
    return f"{arm.replace(':', '_p')}-s{seed}"


# ---------------------------------------------------------------------------------------------------------------
# Task: arithmetic facts split so that no test fact (operation, a, b) is ever seen in training or fine-tuning.
# ---------------------------------------------------------------------------------------------------------------


def fact_question(operation: str, a: int, b: int, rng: random.Random) -> tuple[str, int]:
    from trl_thr.cli.data import ITEMS, NAMES

    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    if operation == "add":
        if rng.random() < 0.5:
            return f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?", a + b
        return f"What is {a} + {b}?", a + b
    if operation == "sub":
        if rng.random() < 0.5:
            return f"{name} has {a} {item} and gives away {b}. How many {item} are left?", a - b
        return f"What is {a} - {b}?", a - b
    return f"What is {a} * {b}?", a * b


def arithmetic_facts(max_operand: int) -> list[tuple[str, int, int]]:
    """Every `(operation, a, b)` with operands in [1, max_operand] (a >= b for sub)."""
    return [(op, a, b) for op in OPERATIONS for a in range(1, max_operand + 1) for b in range(1, max_operand + 1)
            if not (op == "sub" and b > a)]


def arithmetic_splits(max_operand: int, test_fraction: float, seed: int = 1234):
    """`(train facts, test facts)`, disjoint: no test fact is seen in fine-tuning or RL."""
    facts = arithmetic_facts(max_operand)
    random.Random(seed).shuffle(facts)
    cut = int(len(facts) * test_fraction)
    return facts[cut:], facts[:cut]


def sample_problems(facts, count: int, rng: random.Random, exclude=frozenset()) -> list[dict]:
    """`count` problems drawn from `facts` (each fact in a random phrasing), none whose question is in `exclude`."""
    rows, seen = [], set(exclude)
    for _ in range(100 * count):
        if len(rows) == count:
            break
        question, answer = fact_question(*rng.choice(facts), rng)
        if question not in seen:
            seen.add(question)
            rows.append({"question": question, "answer": str(answer)})
    if len(rows) < count:
        raise ValueError(f"only {len(rows)} distinct problems can be drawn, {count} were asked for.")
    return rows


def write_problems(path: Path, rows: list[dict]) -> None:
    write_text_atomically(path, "".join(json.dumps(row) + "\n" for row in rows))


def prepare_task(args, data_dir: Path) -> dict:
    data_dir.mkdir(parents=True, exist_ok=True)
    if args.train_file and args.test_file:
        return {"train": args.train_file, "test": args.test_file, "sft": args.train_file, "source": "files"}
    paths = {"train": data_dir / "train.jsonl", "test": data_dir / "test.jsonl", "sft": data_dir / "sft.jsonl"}
    if args.split_by == "fact":
        train_facts, test_facts = arithmetic_splits(args.max_operand, args.test_fraction)
    else:  # unseen questions; their facts (operation, a, b) also occur in training, in other phrasings
        train_facts = test_facts = arithmetic_facts(args.max_operand)
    if not all(p.exists() for p in paths.values()):
        rng = random.Random(0)
        test = sample_problems(test_facts, args.test_problems, rng)
        held_out = {row["question"] for row in test}
        write_problems(paths["test"], test)
        write_problems(paths["train"], sample_problems(train_facts, args.train_problems, rng, exclude=held_out))
        write_problems(paths["sft"], sample_problems(train_facts, args.sft_problems, rng, exclude=held_out))
    train_questions = {json.loads(line)["question"] for name in ("train", "sft")
                       for line in paths[name].read_text().splitlines()}
    test_rows = [json.loads(line) for line in paths["test"].read_text().splitlines()]
    return {**{k: str(v) for k, v in paths.items()}, "source": "arithmetic", "split_by": args.split_by,
            "test_questions_seen_in_training": sum(r["question"] in train_questions for r in test_rows)}


# ---------------------------------------------------------------------------------------------------------------
# Base model: built from scratch (a small Qwen2 with a tokenizer trained on the task) or a given checkpoint, then
# optionally fine-tuned on the answer format so that its pass rate is moderate before RL.
# ---------------------------------------------------------------------------------------------------------------


def render(tokenizer, template, question: str) -> str:
    from trl_thr.cli.generation import render_prompt

    return render_prompt(tokenizer, template.render(question))


def build_scratch_model(directory: Path, corpus: list[str], args) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from trl_thr.tiny import CHATML

    backend = Tokenizer(models.BPE())
    # Digits one by one, so that numbers are spelled out and arithmetic can generalise to unseen facts.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    backend.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=512, special_tokens=special,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        chat_template=CHATML)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=args.scratch_hidden, num_hidden_layers=args.scratch_layers,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=4 * args.scratch_hidden,
                         max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def greedy_accuracy(model, tokenizer, template, rows, max_new_tokens: int) -> float:
    """Greedy accuracy on `rows` (strict grading, as the reward), in batches; for choosing when to stop SFT."""
    import torch

    from trl_thr.cli.rewards import accuracy

    tokenizer.padding_side = "left"
    model.eval()
    correct = []
    for start in range(0, len(rows), 64):
        chunk = rows[start : start + 64]
        batch = tokenizer([render(tokenizer, template, r["question"]) for r in chunk], return_tensors="pt",
                          padding=True, add_special_tokens=False)
        with torch.no_grad():
            output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(output[:, batch["input_ids"].size(1) :], skip_special_tokens=True)
        correct += accuracy(texts, [r["answer"] for r in chunk])
    model.train()
    return sum(c or 0.0 for c in correct) / len(correct)


def supervised_fine_tune(model_dir: Path, out_dir: Path, task: dict, args) -> dict:
    """Next-token loss on `\\boxed{answer}` completions of the SFT split; stops at `--sft_target` greedy accuracy
    on a held-in probe (training facts) or after `--sft_steps`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_thr.cli.templates import get_template

    torch.manual_seed(0)
    template = get_template(args.prompt_template)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rows = [json.loads(line) for line in Path(task["sft"]).read_text().splitlines()]
    probe = [json.loads(line) for line in Path(task["train"]).read_text().splitlines()][:128]
    examples = []
    for row in rows:
        prompt_ids = tokenizer(render(tokenizer, template, row["question"]), add_special_tokens=False)["input_ids"]
        target_ids = tokenizer("\\boxed{" + row["answer"] + "}", add_special_tokens=False)["input_ids"]
        examples.append((prompt_ids, target_ids + [tokenizer.eos_token_id]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.sft_lr, weight_decay=0.0)
    rng = random.Random(0)
    history, started, accuracy = [], time.time(), 0.0
    model.train()
    for step in range(1, args.sft_steps + 1):
        batch = rng.sample(examples, min(args.sft_batch_size, len(examples)))
        length = max(len(p) + len(t) for p, t in batch)
        ids = torch.full((len(batch), length), tokenizer.pad_token_id)
        labels = torch.full((len(batch), length), -100)
        attention = torch.zeros((len(batch), length), dtype=torch.long)
        for row, (prompt_ids, target_ids) in enumerate(batch):
            sequence = prompt_ids + target_ids
            ids[row, : len(sequence)] = torch.tensor(sequence)
            labels[row, len(prompt_ids) : len(sequence)] = torch.tensor(target_ids)
            attention[row, : len(sequence)] = 1
        loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % args.sft_eval_every == 0 or step == args.sft_steps:
            accuracy = greedy_accuracy(model, tokenizer, template, probe, args.max_completion_length)
            history.append({"step": step, "loss": loss.item(), "probe_greedy_accuracy": accuracy,
                            "seconds": round(time.time() - started, 1)})
            print(f"sft step {step}: loss {loss.item():.3f}, probe greedy accuracy {accuracy:.3f}", flush=True)
            if args.sft_target is not None and accuracy >= args.sft_target:
                break
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"steps": history[-1]["step"] if history else 0, "history": history,
            "seconds": round(time.time() - started, 1)}


def prepare_base(args, root: Path, task: dict) -> dict:
    base_dir = root / "base"
    record_path = root / "base.json"
    if record_path.exists():
        return json.loads(record_path.read_text())
    from trl_thr.cli.models import resolve_model
    from trl_thr.cli.templates import get_template

    record = {"model": args.model}
    if args.model == "scratch":
        from transformers import AutoTokenizer  # noqa: F401  (fails early if transformers is missing)

        template = get_template(args.prompt_template)
        rows = [json.loads(line) for line in Path(task["sft"]).read_text().splitlines()]
        corpus = [f"<|im_start|>user\n{template.render(r['question'])[-1]['content']}<|im_end|>\n"
                  f"<|im_start|>assistant\n\\boxed{{{r['answer']}}}<|im_end|>" for r in rows]
        start_dir = root / "scratch-init"
        build_scratch_model(start_dir, corpus, args)
        record["scratch"] = {"hidden_size": args.scratch_hidden, "layers": args.scratch_layers}
    else:
        start_dir = Path(resolve_model(args.model))
    if args.sft_steps > 0:
        record["sft"] = supervised_fine_tune(start_dir, base_dir, task, args)
        record["path"] = str(base_dir)
    else:
        record["path"] = str(start_dir)
    write_json_atomically(record_path, record)
    return record


# ---------------------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------------------


def cli(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "trl_thr", *arguments]


def run_logged(command: list[str], log: Path) -> float:
    started = time.time()
    with log.open("a") as handle:
        handle.write("$ " + " ".join(command) + "\n")
        handle.flush()
        subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, check=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    return time.time() - started


def train_config(args, arm: str, seed: int, base_path: str, task: dict, output_dir: Path) -> dict:
    strategy, p = parse_arm(arm, args.thr_p)
    config = {
        "model_name_or_path": base_path,
        "dataset_name": task["train"],
        "prompt_template": args.prompt_template,
        "reward_funcs": ["accuracy"],
        "thr_strategy": strategy,
        "thr_p": p,
        "output_dir": str(output_dir),
        "max_steps": args.steps,
        "per_device_train_batch_size": args.prompts_per_step * args.num_generations,
        "num_generations": args.num_generations,
        "max_completion_length": args.max_completion_length,
        "learning_rate": args.learning_rate,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "temperature": args.temperature,
        "beta": 0.0,
        "logging_steps": 1,
        # One checkpoint at the end: its trainer_state.json holds the per-step log history (the curves).
        "save_strategy": "steps",
        "save_steps": args.steps,
        "save_only_model": True,
        "report_to": "none",
        "plot": False,
        "seed": seed,
        "data_seed": seed,
        "use_cpu": args.use_cpu,
        "bf16": False if args.use_cpu else args.bf16,
        "gradient_checkpointing": False,
    }
    return config


def claim(run_dir: Path) -> bool:
    """Take the run's lock file (holding this process id); `False` if a live process holds it. Lets several
    workers share one study directory; a lock left by a killed worker is taken over."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / "lock"
    for _ in range(2):
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = int(lock.read_text() or "0")
                os.kill(holder, 0)
                return holder == os.getpid()
            except (ValueError, ProcessLookupError):
                lock.unlink(missing_ok=True)  # stale: its worker is gone
                continue
        with os.fdopen(descriptor, "w") as handle:
            handle.write(str(os.getpid()))
        return True
    return False


def run_one(args, root: Path, arm: str, seed: int, base: dict, task: dict, provenance: dict) -> dict | None:
    """Train and evaluate one (arm, seed); the finished record, or `None` if another worker is running it."""
    import yaml

    run_dir = root / "runs" / run_name(arm, seed)
    record_path = run_dir / "record.json"
    if record_path.exists():
        return json.loads(record_path.read_text())
    if not claim(run_dir):
        return None
    model_dir = run_dir / "model"
    log = run_dir / "log.txt"
    config = train_config(args, arm, seed, base["path"], task, model_dir)
    config_path = run_dir / "train.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    train_done = run_dir / "train_done.json"
    if not train_done.exists():
        seconds = run_logged(cli("train", "--config", str(config_path)), log)
        state = json.loads((model_dir / f"checkpoint-{args.steps}" / "trainer_state.json").read_text())
        write_json_atomically(train_done, {"seconds": round(seconds, 1), "log_history": state["log_history"]})
    trained = json.loads(train_done.read_text())
    eval_dir = run_dir / "eval"
    started = time.time()
    run_logged(cli("eval", "--model_name_or_path", str(model_dir), "--benchmark", task["test"],
                   "--prompt_template", args.prompt_template, "--n_samples", str(args.n_samples),
                   "--k_values", *[str(k) for k in args.k_values], "--temperature", str(args.temperature),
                   "--max_new_tokens", str(args.max_completion_length), "--backend", "transformers",
                   "--batch_size", str(args.n_samples), "--seed", "0", "--output_dir", str(eval_dir),
                   "--run_name", run_name(arm, seed)), log)
    evaluation = json.loads((eval_dir / f"{run_name(arm, seed)}.json").read_text())
    record = {
        "arm": arm, "seed": seed, "train_config": config, "train_seconds": trained["seconds"],
        "eval_seconds": round(time.time() - started, 1), "metrics": evaluation["metrics"],
        "eval_config": evaluation["config"], "log_history": trained["log_history"], **provenance,
    }
    write_json_atomically(record_path, record)
    (run_dir / "lock").unlink(missing_ok=True)
    return record


def evaluate_base(args, root: Path, base: dict, task: dict) -> dict:
    eval_dir = root / "base-eval"
    result_path = eval_dir / "base.json"
    if not result_path.exists():
        run_logged(cli("eval", "--model_name_or_path", base["path"], "--benchmark", task["test"],
                       "--prompt_template", args.prompt_template, "--n_samples", str(args.n_samples),
                       "--k_values", *[str(k) for k in args.k_values], "--temperature", str(args.temperature),
                       "--max_new_tokens", str(args.max_completion_length), "--backend", "transformers",
                       "--batch_size", str(args.n_samples), "--seed", "0", "--output_dir", str(eval_dir),
                       "--run_name", "base"), root / "base-eval.log")
    return json.loads(result_path.read_text())["metrics"]


def source_provenance() -> dict:
    """Which code ran the study: the package's location, its git commit, and a hash of its source files."""
    import trl_thr

    package = Path(trl_thr.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")) + sorted(package.rglob("*.yaml")):
        digest.update(str(path.relative_to(package)).encode())
        digest.update(path.read_bytes())
    commit = subprocess.run(["git", "-C", str(package), "rev-parse", "HEAD"], capture_output=True, text=True)
    status = subprocess.run(["git", "-C", str(package), "status", "--porcelain", "--", "."], capture_output=True,
                            text=True)
    return {"source": str(package), "source_commit": commit.stdout.strip() or None,
            "source_uncommitted_changes": bool(status.stdout.strip()), "source_sha256": digest.hexdigest()[:16]}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--model", default="scratch", help="'scratch' (a small Qwen2 built here) or a model id/path.")
    parser.add_argument("--scratch_hidden", type=int, default=128)
    parser.add_argument("--scratch_layers", type=int, default=4)
    parser.add_argument("--task", default="arithmetic", choices=["arithmetic"],
                        help="Procedural task split by fact; or give --train_file and --test_file.")
    parser.add_argument("--train_file", default=None, help="JSONL with question/answer columns (instead of --task).")
    parser.add_argument("--test_file", default=None)
    parser.add_argument("--max_operand", type=int, default=20)
    parser.add_argument("--test_fraction", type=float, default=0.2, help="Share of facts held out (split_by=fact).")
    parser.add_argument("--split_by", default="question", choices=["question", "fact"],
                        help="Hold out questions (facts recur in other phrasings) or whole facts (operation, a, b).")
    parser.add_argument("--train_problems", type=int, default=2000)
    parser.add_argument("--sft_problems", type=int, default=4000)
    parser.add_argument("--test_problems", type=int, default=128)
    parser.add_argument("--prompt_template", default="chat-boxed-short")
    parser.add_argument("--sft_steps", type=int, default=600, help="0: no fine-tuning before RL.")
    parser.add_argument("--sft_target", type=float, default=None, help="Stop SFT at this greedy probe accuracy.")
    parser.add_argument("--sft_eval_every", type=int, default=100)
    parser.add_argument("--sft_lr", type=float, default=1e-3)
    parser.add_argument("--sft_batch_size", type=int, default=64)
    parser.add_argument("--arms", nargs="+", default=["grpo", "positive-amplify", "negative-amplify"],
                        help=f"Arms: one of {NAMED_ARMS} (p from --thr_p), or strategy:p, e.g. amplify:-0.25.")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--thr_p", type=float, default=0.1, help="|p| of the amplify arms.")
    parser.add_argument("--prompts_per_step", type=int, default=8)
    parser.add_argument("--num_generations", type=int, default=8)
    parser.add_argument("--max_completion_length", type=int, default=12)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--n_samples", type=int, default=16)
    parser.add_argument("--k_values", nargs="+", type=int, default=list(range(1, 17)))
    parser.add_argument("--use_cpu", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--only_prepare", action="store_true", help="Build the base model and evaluate it, then stop.")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    for arm in args.arms:  # refuse a misspelt arm before any work
        try:
            parse_arm(arm, args.thr_p)
        except ValueError as error:
            raise SystemExit(f"--arms: {error}") from None
    root = Path(args.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    provenance = source_provenance()
    write_json_atomically(root / "study.json", {"args": vars(args), "argv": sys.argv, **provenance})
    task = prepare_task(args, root / "data")
    base = prepare_base(args, root, task)
    base_metrics = evaluate_base(args, root, base, task)
    print(f"base model: greedy {base_metrics.get('greedy_accuracy')}, pass@1 {base_metrics.get('pass@1')}",
          flush=True)
    if args.only_prepare:
        return
    for seed in args.seeds:
        for arm in args.arms:
            started = time.time()
            record = run_one(args, root, arm, seed, base, task, provenance)
            if record is None:
                print(f"{arm} seed {seed}: running in another worker", flush=True)
                continue
            print(f"{arm} seed {seed}: greedy {record['metrics'].get('greedy_accuracy')}, "
                  f"pass@1 {record['metrics'].get('pass@1')} ({time.time() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
