"""lorazoo report: Markdown tables and PNG plots from a study file."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("report", help="tables and plots from a study file",
                       description="Metric against learning rate per task (one line per variant), best "
                                   "learning rate and score per variant, loss curves and loss AUC.")
    p.add_argument("db", help="the study file written by lorazoo study")
    p.add_argument("--study", help="which study, when the file holds several")
    p.add_argument("--out", help="output folder (default: <db>-report beside the file)")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from ..study.report import report

    text = report(args.db, args.out, study=args.study, with_plots=not args.no_plots)
    print(text)
    out = args.out or str(Path(args.db).with_name(Path(args.db).stem + "-report"))
    print(f"\nwritten: {out}/report.md" + ("" if args.no_plots else " and PNG plots"))
    return 0
