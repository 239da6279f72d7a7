"""docs/operators.md, generated from the operator specs (python -m mpk.opdocs > docs/operators.md)."""

from __future__ import annotations

from mpk.ops import SPECS, task_kinds


def operators_markdown() -> str:
    lines = [
        "# Operators",
        "",
        "Generated from the operator specs in `mpk/ops/` by `python -m mpk.opdocs`; a test",
        "keeps this page in sync. The task kind number is the index used by generated code.",
        "",
        "| kind | task kind | inputs | outputs | in place | attributes |",
        "|---|---|---|---|---|---|",
    ]
    for number, kind in enumerate(task_kinds()):
        spec = SPECS[kind]
        inputs = ", ".join([*spec.inputs, *(f"{r} (optional)" for r in spec.optional_inputs)])
        inplace = ", ".join(f"{out} = {src}" for out, src in spec.inplace.items()) or "-"
        lines.append(f"| `{kind}` | {number} | {inputs} | {', '.join(spec.outputs)} | {inplace} | {', '.join(spec.attributes) or '-'} |")
    lines.append("")
    for kind in task_kinds():
        lines += [f"## {kind}", "", SPECS[kind].doc, ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(operators_markdown(), end="")
