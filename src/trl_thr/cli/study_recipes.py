"""Preparation recipes of `trl-thr study`: data splits and a base model made before any arm trains.

One recipe, `arithmetic-scratch` (docs/science.md section 3): seeded questions split so that no test question is seen
in training or fine-tuning (arithmetic facts, or a procedural task of reasoning-gym with `task:
reasoning-gym:<name>`); a small Qwen2 built from scratch with a BPE tokenizer trained on the task (or a given model);
then supervised fine-tuning on `\\boxed{answer}` completions until a greedy probe accuracy, so that the base model
half-solves the task before RL. Everything is seeded: the same fields give the same data and the same base model on
the same software.

A recipe writes `data/{train,test,sft}.jsonl`, `base/` and `base.json` under the study directory; each file is
written atomically and a finished step is skipped when the study restarts.
"""

import json
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..files import write_json_atomically, write_text_atomically
from .errors import UsageError

OPERATIONS = ("add", "sub", "mul")


@dataclass
class ArithmeticScratchRecipe:
    """The fields of `prepare: {recipe: arithmetic-scratch, ...}` in a study config."""

    model: str = field(default="scratch", metadata={"help": "'scratch' (a small Qwen2 built here) or a model id/path."})
    task: str = field(default="arithmetic", metadata={
        "help": "'arithmetic' (facts with operands up to max_operand) or 'reasoning-gym:<task>' (the tasks extra)."})
    task_config: dict = field(default_factory=dict, metadata={
        "help": "Keyword arguments of reasoning_gym.create_dataset for a reasoning-gym task (e.g. min_words)."})
    scratch_hidden: int = field(default=128, metadata={"help": "Hidden size of the scratch model."})
    scratch_layers: int = field(default=4, metadata={"help": "Layers of the scratch model."})
    max_operand: int = field(default=20, metadata={"help": "Largest operand of the arithmetic questions."})
    split_by: str = field(default="question", metadata={
        "help": "'question': hold out questions (their facts recur in other phrasings); 'fact': hold out whole facts "
                "(operation, a, b)."})
    test_fraction: float = field(default=0.2, metadata={"help": "Share of facts held out (split_by: fact)."})
    train_problems: int = field(default=2000, metadata={"help": "Questions of the RL training split."})
    sft_problems: int = field(default=4000, metadata={"help": "Questions of the fine-tuning split."})
    test_problems: int = field(default=128, metadata={"help": "Held-out questions the arms are evaluated on."})
    sft_steps: int = field(default=600, metadata={"help": "Fine-tuning steps at most (0: no fine-tuning)."})
    sft_target: float | None = field(default=None, metadata={
        "help": "Stop fine-tuning at this greedy accuracy on a probe of 128 training questions."})
    require_sft_target: bool = field(default=False, metadata={
        "help": "Refuse to train the arms when fine-tuning ended below sft_target (otherwise the study says so and "
                "goes on: a base that rarely earns a reward gives runs that rarely learn)."})
    sft_eval_every: int = field(default=100, metadata={"help": "Probe the accuracy every this many steps."})
    sft_lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate of the fine-tuning."})
    sft_batch_size: int = field(default=64, metadata={"help": "Sequences per fine-tuning step."})

    @classmethod
    def from_dict(cls, values: dict) -> "ArithmeticScratchRecipe":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UsageError(f"prepare: unknown field(s) {', '.join(unknown)} for recipe arithmetic-scratch; known: "
                             f"{', '.join(sorted(known))}.")
        recipe = cls(**values)
        if recipe.task != "arithmetic" and not recipe.task.startswith("reasoning-gym:"):
            raise UsageError(f"prepare.task={recipe.task!r} must be 'arithmetic' or 'reasoning-gym:<task>'.")
        if recipe.task_config and recipe.task == "arithmetic":
            raise UsageError("prepare.task_config is for a reasoning-gym task; arithmetic takes max_operand.")
        if recipe.split_by == "fact" and recipe.task != "arithmetic":
            raise UsageError("prepare.split_by=fact holds out arithmetic facts; a reasoning-gym task splits by question.")
        if recipe.split_by not in ("question", "fact"):
            raise UsageError(f"prepare.split_by={recipe.split_by!r} must be 'question' or 'fact'.")
        for name in ("scratch_hidden", "scratch_layers", "max_operand", "train_problems", "sft_problems",
                     "test_problems", "sft_eval_every", "sft_batch_size"):
            if not isinstance(getattr(recipe, name), int) or getattr(recipe, name) < 1:
                raise UsageError(f"prepare.{name}={getattr(recipe, name)!r} must be a positive integer.")
        return recipe


RECIPES = {"arithmetic-scratch": ArithmeticScratchRecipe}


def parse_recipe(values: dict):
    """The recipe object of a `prepare:` mapping (`recipe:` names it)."""
    values = dict(values)
    name = values.pop("recipe", None)
    if name not in RECIPES:
        raise UsageError(f"prepare.recipe={name!r} is not one of {', '.join(RECIPES)}.")
    return RECIPES[name].from_dict(values)


# ---- the task -------------------------------------------------------------------------------------------------------


def fact_question(operation: str, a: int, b: int, rng: random.Random) -> tuple[str, int]:
    from .data import ITEMS, NAMES

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
        raise UsageError(f"prepare: only {len(rows)} distinct problems can be drawn, {count} were asked for; raise "
                         "max_operand or ask for fewer problems.")
    return rows


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def reasoning_gym_splits(recipe: ArithmeticScratchRecipe) -> dict[str, list[dict]]:
    """Test, train and fine-tuning questions of a reasoning-gym task: distinct questions, the test ones first, none
    of them in the other splits."""
    try:
        import reasoning_gym
    except ImportError:
        raise UsageError(f"prepare.task={recipe.task} needs reasoning-gym: pip install 'trl-thr[tasks]'.") from None
    wanted = {"test": recipe.test_problems, "train": recipe.train_problems, "sft": recipe.sft_problems}
    name = recipe.task.split(":", 1)[1]
    try:
        rows = reasoning_gym.create_dataset(name, size=4 * sum(wanted.values()), seed=0, **recipe.task_config)
    except (ValueError, TypeError, KeyError) as error:
        raise UsageError(f"prepare.task={recipe.task} with task_config={recipe.task_config}: {error}") from None
    splits = {split: [] for split in wanted}
    seen = set()
    for row in rows:
        question = row["question"]
        if question in seen:
            continue
        seen.add(question)
        split = next((s for s in ("test", "train", "sft") if len(splits[s]) < wanted[s]), None)
        if split is None:
            break
        splits[split].append({"question": question, "answer": str(row["answer"])})
    short = {s: len(splits[s]) for s in wanted if len(splits[s]) < wanted[s]}
    if short:
        raise UsageError(f"prepare: {recipe.task} gives only {short} distinct questions of {wanted}; ask for fewer.")
    return splits


def prepare_task(recipe: ArithmeticScratchRecipe, data_dir: Path) -> dict:
    """`{"train", "test", "sft"}` paths of the splits (written once), and how held out the test split is."""
    data_dir.mkdir(parents=True, exist_ok=True)
    paths = {"train": data_dir / "train.jsonl", "test": data_dir / "test.jsonl", "sft": data_dir / "sft.jsonl"}
    if recipe.task != "arithmetic":
        if not all(p.exists() for p in paths.values()):
            for name, rows in reasoning_gym_splits(recipe).items():
                write_text_atomically(paths[name], "".join(json.dumps(row) + "\n" for row in rows))
        seen = {row["question"] for name in ("train", "sft") for row in read_rows(paths[name])}
        return {**{k: str(v) for k, v in paths.items()},
                "test_questions_seen_in_training": sum(r["question"] in seen for r in read_rows(paths["test"]))}
    if recipe.split_by == "fact":
        train_facts, test_facts = arithmetic_splits(recipe.max_operand, recipe.test_fraction)
    else:
        train_facts = test_facts = arithmetic_facts(recipe.max_operand)
    if not all(p.exists() for p in paths.values()):
        rng = random.Random(0)
        test = sample_problems(test_facts, recipe.test_problems, rng)
        held_out = {row["question"] for row in test}
        splits = {"test": test,
                  "train": sample_problems(train_facts, recipe.train_problems, rng, exclude=held_out),
                  "sft": sample_problems(train_facts, recipe.sft_problems, rng, exclude=held_out)}
        for name in ("test", "train", "sft"):
            write_text_atomically(paths[name], "".join(json.dumps(row) + "\n" for row in splits[name]))
    seen = {row["question"] for name in ("train", "sft") for row in read_rows(paths[name])}
    return {**{k: str(v) for k, v in paths.items()},
            "test_questions_seen_in_training": sum(r["question"] in seen for r in read_rows(paths["test"]))}


# ---- the base model -------------------------------------------------------------------------------------------------


def build_scratch_model(directory: Path, corpus: list[str], recipe: ArithmeticScratchRecipe) -> None:
    """A small Qwen2 with a 512-token BPE tokenizer trained on `corpus` (digits one by one), saved to `directory`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from ..tiny import CHATML

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
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=recipe.scratch_hidden,
                         num_hidden_layers=recipe.scratch_layers, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=4 * recipe.scratch_hidden, max_position_embeddings=512,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def greedy_accuracy(model, tokenizer, template, rows, max_new_tokens: int) -> float:
    """Greedy accuracy on `rows` (strict grading, as the reward), in batches; for choosing when to stop SFT."""
    import torch

    from .generation import render_prompt
    from .rewards import accuracy

    tokenizer.padding_side = "left"
    model.eval()
    correct = []
    for start in range(0, len(rows), 64):
        chunk = rows[start : start + 64]
        batch = tokenizer([render_prompt(tokenizer, template.render(r["question"])) for r in chunk],
                          return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(output[:, batch["input_ids"].size(1) :], skip_special_tokens=True)
        correct += accuracy(texts, [r["answer"] for r in chunk])
    model.train()
    return sum(c or 0.0 for c in correct) / len(correct)


def supervised_fine_tune(model_dir: Path, out_dir: Path, task: dict, recipe: ArithmeticScratchRecipe, template,
                         max_new_tokens: int) -> dict:
    """Next-token loss on `\\boxed{answer}` completions of the SFT split; stops at `sft_target` greedy accuracy on a
    probe of training questions, or after `sft_steps`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .generation import render_prompt

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rows, probe = read_rows(task["sft"]), read_rows(task["train"])[:128]
    examples = []
    for row in rows:
        prompt_ids = tokenizer(render_prompt(tokenizer, template.render(row["question"])),
                               add_special_tokens=False)["input_ids"]
        target_ids = tokenizer("\\boxed{" + row["answer"] + "}", add_special_tokens=False)["input_ids"]
        examples.append((prompt_ids, target_ids + [tokenizer.eos_token_id]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.sft_lr, weight_decay=0.0)
    rng = random.Random(0)
    history, started = [], time.time()
    model.train()
    for step in range(1, recipe.sft_steps + 1):
        batch = rng.sample(examples, min(recipe.sft_batch_size, len(examples)))
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
        if step % recipe.sft_eval_every == 0 or step == recipe.sft_steps:
            accuracy = greedy_accuracy(model, tokenizer, template, probe, max_new_tokens)
            history.append({"step": step, "loss": loss.item(), "probe_greedy_accuracy": accuracy,
                            "seconds": round(time.time() - started, 1)})
            print(f"[study] fine-tuning step {step}: loss {loss.item():.3f}, probe greedy accuracy {accuracy:.3f}",
                  flush=True)
            if recipe.sft_target is not None and accuracy >= recipe.sft_target:
                break
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    reached = history[-1]["probe_greedy_accuracy"] if history else None
    return {"steps": history[-1]["step"] if history else 0, "history": history,
            "seconds": round(time.time() - started, 1), "probe_greedy_accuracy": reached,
            "target_reached": None if recipe.sft_target is None else (reached is not None
                                                                       and reached >= recipe.sft_target)}


def recipe_outputs(recipe: ArithmeticScratchRecipe, root: Path) -> dict:
    """`{"model", "train", "test"}`: where the recipe puts the base model and the splits under `root`."""
    if recipe.sft_steps > 0:
        model = str(root / "base")
    else:
        model = str(root / "scratch-init") if recipe.model == "scratch" else recipe.model
    return {"model": model, "train": str(root / "data" / "train.jsonl"), "test": str(root / "data" / "test.jsonl")}


def sft_target_missed(record: dict) -> str | None:
    """One line saying that the recipe's fine-tuning ended below its `sft_target`, from its `base.json`; None if it
    reached it or had none."""
    sft, target = record.get("sft") or {}, record.get("sft_target")
    history = sft.get("history") or []
    if target is None or not history or history[-1]["probe_greedy_accuracy"] >= target:
        return None
    return (f"the base model's fine-tuning ended at {100 * history[-1]['probe_greedy_accuracy']:.1f} % greedy "
            f"accuracy on its probe after {history[-1]['step']} steps, below its sft_target of {100 * target:.0f} %")


def check_sft_target(recipe: ArithmeticScratchRecipe, record_path: Path) -> None:
    """Say (once per study command) or refuse, with `require_sft_target`, a base that missed its target."""
    missed = sft_target_missed(json.loads(record_path.read_text()))
    if missed is None:
        return
    if recipe.require_sft_target:
        raise UsageError(f"{missed} ({record_path}); raise prepare.sft_steps or sft_lr and remove {record_path.name} "
                         "and base/ to fine-tune again, or set require_sft_target: false to go on.")
    print(f"[study] warning: {missed}; the arms train from it all the same (far below its target, a base rarely "
          "earns a reward, and its runs rarely learn). Raise prepare.sft_steps or sft_lr, or set "
          "prepare.require_sft_target: true to stop here.", flush=True)


def prepare(recipe: ArithmeticScratchRecipe, root: Path, prompt_template: str, max_new_tokens: int) -> dict:
    """Run the recipe under the study directory `root` (each finished step is kept): `{"model", "train", "test"}`
    paths for the arms' training and evaluation, with the record of how the base was made."""
    from .models import resolve_model
    from .templates import get_template

    task = prepare_task(recipe, root / "data")
    record_path = root / "base.json"
    if not record_path.exists():
        template = get_template(prompt_template)
        record = {"recipe": "arithmetic-scratch", **asdict(recipe)}
        if recipe.model == "scratch":
            corpus = [f"<|im_start|>user\n{template.render(r['question'])[-1]['content']}<|im_end|>\n"
                      f"<|im_start|>assistant\n\\boxed{{{r['answer']}}}<|im_end|>" for r in read_rows(task["sft"])]
            start_dir = root / "scratch-init"
            build_scratch_model(start_dir, corpus, recipe)
        else:
            start_dir = Path(resolve_model(recipe.model))
        if recipe.sft_steps > 0:
            record["sft"] = supervised_fine_tune(start_dir, root / "base", task, recipe, template, max_new_tokens)
        record["test_questions_seen_in_training"] = task["test_questions_seen_in_training"]
        write_json_atomically(record_path, record)
    outputs = recipe_outputs(recipe, root)
    if not Path(outputs["model"]).is_dir() and (recipe.sft_steps > 0 or recipe.model == "scratch"):
        raise UsageError(f"{record_path} says the base model was made, but {outputs['model']} is missing: copy the "
                         f"study's {Path(outputs['model']).name}/ directory with base.json, or remove base.json to "
                         "build the base again (on another machine it may not be the same base).")
    return {**outputs, "record": json.loads(record_path.read_text())}
