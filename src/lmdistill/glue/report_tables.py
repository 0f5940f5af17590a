"""Collect distillation and fine-tuning runs into one table (one row per fine-tuned model).

    dirs --walk--> summary.json (distillation runs), results.json (fine-tuning runs)
      --join: results.model == summary.export_dir (or the summary beside the model directory)-->
      rows: run, method, teacher, student shape, steps, final loss, family, params, GFLOPs, per
      task best and median dev score over the runs of that model (a grid), average
      --> report.md, report.csv

Distillation runs with GLUE attached (`lmdistill-distill ... eval=glue`) carry their scores in
summary.json (`glue`, and `assistant.glue` for a teacher assistant, which gets a row of its own:
`<run>/stage1_assistant`): every grid point counts as one fine-tuning run of the model (best and
median), and the results.json files under `<run>/eval/` are not counted a second time.

A family is the sub-networks exported from one once-for-all super-net (`ofa.export`,
`lmdistill-export-subnet`): their provenance has `subnet` and `supernet_dir`; the `family`
column names the super-net's run, and the score plot draws one curve per family.

Every row has a `run` name of its own: the distillation run's directory, with as many parent
directories as it takes to tell it from the others (`3_method-minilm_v1` in a sweep,
`2025-01-31/12-00-00` for single runs), or the fine-tuned model's name when no distillation run
exported it.

Scores are the task's main score (GLUE convention, `lmdistill.glue.tasks`) times 100.
"""

from __future__ import annotations

import csv
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from lmdistill.errors import UserError
from lmdistill.glue.tasks import TASKS, get_task

PROVENANCE_FILE = "lmdistill_provenance.json"


@dataclass
class Row:
    """One fine-tuned model: its origin and every fine-tuning run on it, by task."""

    model: str
    method: str
    teacher: str
    shape: str  # "LxH", e.g. 6x384
    params: int | None
    gflops: float | None
    summary_dir: Path | None = None  # the distillation run, if the model came from one
    scores: dict[str, list[float]] = field(default_factory=dict)  # task -> main scores x 100
    run: str = ""  # unique among the rows of a report (set by build_rows)
    steps: int | None = None  # distillation steps
    final_loss: float | None = None  # distillation loss, mean of the last 10 steps
    family: str | None = None  # sub-networks of one super-net: its run's name (set by build_rows)
    supernet_dir: str | None = None  # the super-net a sub-network was carved from

    def label(self) -> str:
        """The run and what sets it apart: for legends."""
        parts = [Path(self.teacher).name or self.teacher, self.shape]
        if self.steps is not None:
            parts.append(f"{self.steps} steps")
        if self.final_loss is not None:
            parts.append(f"final loss {self.final_loss:.3g}")
        return f"{self.run} ({', '.join(parts)})"

    def best(self, task: str) -> float | None:
        return max(self.scores[task]) if self.scores.get(task) else None

    def median(self, task: str) -> float | None:
        return statistics.median(self.scores[task]) if self.scores.get(task) else None

    def average(self, value=None) -> float | None:
        """Mean over the tasks this model was fine-tuned on of `value` (default: the best score)."""
        value = value or Row.best
        scores = [value(self, t) for t in self.scores if self.scores[t]]
        return sum(scores) / len(scores) if scores else None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is not readable JSON ({err}); remove or repair it") from err
    if not isinstance(data, dict):
        raise UserError(f"{path} does not hold a JSON object; remove or repair it")
    return data


def collect(dirs: list[str | Path]) -> tuple[dict[Path, dict], list[dict]]:
    """({run dir: summary}, [results]) found under `dirs`, recursively."""
    summaries: dict[Path, dict] = {}
    results: list[dict] = []
    for root in dirs:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise UserError(f"{root} is not a directory; pass run or sweep directories")
        for path in sorted(root.rglob("summary.json")):
            summaries[path.parent.resolve()] = _read_json(path)
        for path in sorted(root.rglob("results.json")):
            data = _read_json(path)
            if "task" not in data or "metrics" not in data:
                raise UserError(f"{path} has no task/metrics; it is not an lmdistill results.json")
            results.append({**data, "_dir": str(path.parent)})
    if not summaries and not results:
        raise UserError(
            f"no summary.json or results.json under {', '.join(map(str, dirs))}; "
            "pass the output directories of lmdistill-distill or lmdistill-finetune runs"
        )
    return summaries, results


def _summary_of(model: str, by_export: dict[str, Path], summaries: dict[Path, dict]):
    """The distillation run that exported `model`, if any: (run dir, summary) or (None, None)."""
    resolved = str(Path(model).expanduser().resolve())
    if resolved in by_export:
        run_dir = by_export[resolved]
        return run_dir, summaries[run_dir]
    model_dir = Path(resolved)
    beside = model_dir.parent / "summary.json"
    if (model_dir / PROVENANCE_FILE).exists() and beside.exists():  # moved or copied run
        return model_dir.parent, summaries.get(model_dir.parent) or _read_json(beside)
    return None, None


def _subnet_provenance(model: str) -> dict | None:
    """The provenance of an exported sub-network of a once-for-all super-net, else None."""
    path = Path(model).expanduser() / PROVENANCE_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if isinstance(record, dict) and record.get("subnet") and record.get("supernet_dir"):
        return record
    return None


def _family_row(res: dict, record: dict, by_export: dict, summaries: dict) -> Row:
    """A fine-tuned sub-network: method, teacher and steps of its super-net's run."""
    supernet = str(Path(record["supernet_dir"]).expanduser().resolve())
    summary = summaries.get(by_export.get(supernet), {})
    method = summary.get("method") or str(record.get("method", "?")).rsplit(".", 1)[0]
    method = method.rsplit(".", 1)[-1]  # lmdistill.methods.ofa_minilm(.OFAMiniLM) -> ofa_minilm
    subnet, shape = record["subnet"], res.get("model_shape") or {}
    return Row(
        model=str(res["model"]),
        method=method,
        teacher=str(record.get("teacher", "-")),
        shape=_shape(shape or subnet),
        params=shape.get("params", subnet.get("params")),
        gflops=shape.get("gflops", subnet.get("gflops")),
        steps=record.get("steps"),
        supernet_dir=supernet,
    )


def _name_families(rows: list[Row], by_export: dict[str, Path]) -> None:
    """`row.family`: the run name of the super-net's distillation run where it is in the
    report, else its run directory's name (`#2`, `#3` where two families share it)."""
    run_names = {r.summary_dir: r.run for r in rows if r.summary_dir is not None}
    names: dict[str, str] = {}
    for r in rows:
        if r.supernet_dir is None or r.supernet_dir in names:
            continue
        run_dir = by_export.get(r.supernet_dir)
        if run_dir in run_names:
            name = run_names[run_dir]
        else:
            path = Path(r.supernet_dir)
            name = path.parent.name if path.name == "student" else path.name
        taken = set(names.values())
        unique, n = name, 1
        while unique in taken:
            n += 1
            unique = f"{name} #{n}"
        names[r.supernet_dir] = unique
    for r in rows:
        if r.supernet_dir is not None:
            r.family = names[r.supernet_dir]


def _shape(student: dict) -> str:
    layers, hidden = student.get("num_hidden_layers"), student.get("hidden_size")
    return f"{layers}x{hidden}" if layers and hidden else "?"


def _attached_scores(glue: dict) -> dict[str, list[float]]:
    """{task: every grid point's score x 100} of a summary's `glue` (lmdistill.glue.attached)."""
    scores = {}
    for name, entry in glue.items():
        if name in TASKS and isinstance(entry, dict):
            grid = entry.get("grid") or [entry]
            scores[name] = [100.0 * point["score"] for point in grid]
    return scores


def _is_attached(res: dict, summaries: dict[Path, dict]) -> bool:
    """Whether a results.json is a grid point of a run's attached GLUE evaluation (`<run>/eval/`)
    that its summary.json reports already."""
    where = Path(res["_dir"]).resolve()
    return any(
        where.is_relative_to(run_dir / "eval") for run_dir, s in summaries.items() if s.get("glue")
    )


def _add_attached(rows: dict, summaries: dict[Path, dict]) -> None:
    """The GLUE scores in summary.json (`glue`, `assistant.glue`) into the rows of their models;
    a teacher assistant gets a row of its own."""
    for run_dir, summary in summaries.items():
        if summary.get("glue"):
            row = next((r for r in rows.values() if r.summary_dir == run_dir), None)
            if row is None:  # its export's row came from another summary (a stage's own)
                export = str(summary.get("export_dir"))
                row = rows[(export, "glue")] = _row_from_summary(run_dir, summary, export)
            _extend(row, _attached_scores(summary["glue"]))
        assistant = summary.get("assistant")
        if isinstance(assistant, dict) and assistant.get("glue") and assistant.get("export_dir"):
            key = (str(assistant["export_dir"]), "pretrained")
            if key not in rows:
                rows[key] = _row_from_summary(
                    run_dir / "stage1_assistant", assistant.get("summary") or {},
                    str(assistant["export_dir"]),
                )  # fmt: skip
            _extend(rows[key], _attached_scores(assistant["glue"]))


def _extend(row: Row, scores: dict[str, list[float]]) -> None:
    for task, values in scores.items():
        row.scores.setdefault(task, []).extend(values)


def build_rows(summaries: dict[Path, dict], results: list[dict]) -> list[Row]:
    """One row per (model, init) with fine-tuning results, plus distillation runs without any."""
    results = [r for r in results if not _is_attached(r, summaries)]
    by_export = {
        str(Path(s["export_dir"]).expanduser().resolve()): d
        for d, s in summaries.items()
        if s.get("export_dir")
    }
    rows: dict[tuple[str, str], Row] = {}
    used: set[Path] = set()
    for res in results:
        init = res.get("init", "pretrained")
        key = (str(res["model"]), init)
        if key not in rows:
            run_dir, summary = _summary_of(res["model"], by_export, summaries)
            subnet = _subnet_provenance(str(res["model"])) if summary is None else None
            if subnet is not None and init == "pretrained":
                rows[key] = _family_row(res, subnet, by_export, summaries)
            elif summary is not None and init == "pretrained":
                used.add(run_dir)
                rows[key] = _row_from_summary(run_dir, summary, str(res["model"]))
            else:
                shape = res.get("model_shape") or {}
                name = res.get("model_name") or Path(res["model"]).name
                rows[key] = Row(
                    model=str(res["model"]),
                    method=name if init == "pretrained" else f"{name} (random init)",
                    teacher=teacher_name(summary) if summary else "-",
                    shape=_shape(shape),
                    params=shape.get("params"),
                    gflops=shape.get("gflops"),
                )
        task = get_task(res["task"])
        score = res.get("score")
        if score is None:
            score = task.main_score(res["metrics"])
        rows[key].scores.setdefault(task.name, []).append(100.0 * score)
    for run_dir, summary in summaries.items():
        if run_dir not in used:
            rows[(str(summary.get("export_dir")), "distilled")] = _row_from_summary(
                run_dir, summary, str(summary.get("export_dir"))
            )
    _add_attached(rows, summaries)
    out = list(rows.values())
    _name_runs(out)
    _name_families(out, by_export)
    return out


def _name_runs(rows: list[Row]) -> None:
    """`row.run`: the shortest trailing part of the run directory (or the model's name) that no
    other row shares; `#2`, `#3` for rows that nothing else tells apart."""
    paths = []
    for r in rows:
        if r.summary_dir is not None:
            paths.append(Path(r.summary_dir).parts)
        else:  # a fine-tuned model that no distillation run here exported
            parts = Path(r.model).parts or (r.model,)
            if r.method.endswith("(random init)"):
                parts = (*parts[:-1], f"{parts[-1]} (random init)")
            paths.append(parts)
    depth = {i: 1 for i in range(len(rows))}
    while True:
        names = ["/".join(p[-depth[i] :]) for i, p in enumerate(paths)]
        clashes = [
            i for i, n in enumerate(names) if names.count(n) > 1 and depth[i] < len(paths[i])
        ]
        if not clashes:
            break
        for i in clashes:
            depth[i] += 1
    seen: dict[str, int] = {}
    for r, name in zip(rows, names, strict=True):
        seen[name] = seen.get(name, 0) + 1
        r.run = name if names.count(name) == 1 else f"{name} #{seen[name]}"


def teacher_name(summary: dict) -> str:
    """A run's teacher; a teacher-assistant run's is the original teacher and the assistant's
    shape (`<teacher> via TA 6x384`), not the assistant's export directory that taught stage 2."""
    teacher = summary.get("teacher", {})
    name = str(teacher.get("name_or_path", "?")) if isinstance(teacher, dict) else str(teacher)
    assistant = summary.get("assistant")
    first = assistant.get("summary") if isinstance(assistant, dict) else None
    if isinstance(first, dict):
        name = f"{teacher_name(first)} via TA {_shape(first.get('student', {}))}"
    return name


def _row_from_summary(run_dir: Path, summary: dict, model: str) -> Row:
    student = summary.get("student", {})
    return Row(
        model=model,
        method=str(summary.get("method", "?")),
        teacher=teacher_name(summary),
        shape=_shape(student),
        params=student.get("params"),
        gflops=student.get("gflops"),
        summary_dir=run_dir,
        steps=summary.get("steps"),
        final_loss=summary.get("final_loss"),
    )


def task_columns(rows: list[Row]) -> list[str]:
    """Tasks that appear in any row, in the order of `TASKS`."""
    present = {t for r in rows for t in r.scores}
    return [t for t in TASKS if t in present]


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _params_m(row: Row) -> str:
    return "-" if row.params is None else f"{row.params / 1e6:.1f}"


def to_markdown(rows: list[Row]) -> str:
    """The best-score table, and a median table when any task has several runs (a grid)."""
    tasks = task_columns(rows)
    head = ["run", "method", "teacher", "student (LxH)", "steps", "final loss", "family",
            "params (M)", "GFLOPs", *tasks, "average"]  # fmt: skip

    def table(value) -> list[str]:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            cells = [r.run, r.method, Path(r.teacher).name or r.teacher, r.shape]
            cells += ["-" if r.steps is None else str(r.steps), _fmt(r.final_loss, 4)]
            cells += [r.family or "-", _params_m(r)]
            cells += [_fmt(r.gflops, 2), *(_fmt(value(r, t)) for t in tasks)]
            cells.append(_fmt(r.average(value)))
            lines.append("| " + " | ".join(cells) + " |")
        return lines

    out = ["## Dev scores (best run per task)", ""] + table(Row.best)
    if any(len(v) > 1 for r in rows for v in r.scores.values()):
        out += ["", "## Median over the runs of each task", ""] + table(Row.median)
        out += ["", "Runs per task: " + "; ".join(
            f"{r.run}: " + ", ".join(f"{t} {len(r.scores[t])}" for t in r.scores)
            for r in rows if r.scores
        )]  # fmt: skip
    out += [
        "",
        "Scores x 100: CoLA Matthews corr.; STS-B mean of Pearson and Spearman; MRPC, QQP mean "
        "of F1 and accuracy; MNLI mean of matched and mismatched accuracy; accuracy otherwise. "
        "Average: mean over the tasks of the row. GFLOPs per 128-token sequence. Family: the "
        "once-for-all super-net (its run) a sub-network was exported from.",
    ]
    return "\n".join(out) + "\n"


def to_csv(rows: list[Row], path: str | Path) -> Path:
    tasks = task_columns(rows)
    head = ["run", "method", "teacher", "student", "steps", "final_loss", "family", "params",
            "gflops"]  # fmt: skip
    head += [f"{t}{suffix}" for t in tasks for suffix in ("", "_median", "_runs")]
    head += ["average", "model"]
    path = Path(path)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(head)
        for r in rows:
            cells = [r.run, r.method, r.teacher, r.shape, r.steps, r.final_loss, r.family or "",
                     r.params, r.gflops]  # fmt: skip
            for t in tasks:
                cells += [r.best(t), r.median(t), len(r.scores.get(t, []))]
            writer.writerow([*cells, r.average(), r.model])
    return path


def loss_curve(run_dir: Path) -> tuple[list[int], list[float]]:
    """(steps, train/loss) from a run's logs/metrics.csv; empty when there is none."""
    path = Path(run_dir) / "logs" / "metrics.csv"
    steps, losses = [], []
    if path.exists():
        with open(path, newline="") as f:
            for record in csv.DictReader(f):
                if record.get("train/loss") not in (None, ""):
                    steps.append(int(float(record["step"])))
                    losses.append(float(record["train/loss"]))
    return steps, losses
