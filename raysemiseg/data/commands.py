"""``raysemiseg data ...``: build, summary, split, export-voc, make-sample."""

from __future__ import annotations

import argparse

from raysemiseg.data import sample


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``data`` command and its sub-commands."""
    p = subparsers.add_parser("data", help="build, inspect, split and export the Parquet image store")
    sub = p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")

    b = sub.add_parser("build", help="read sources, validate, write the Parquet image store (Ray Data)")
    b.add_argument("--coco", nargs=2, action="append", default=[], metavar=("ANNOTATIONS_JSON", "IMAGES_DIR"),
                   help="a COCO instances JSON and its image folder (repeatable)")
    b.add_argument("--voc", action="append", default=[], metavar="DIR",
                   help="a VOC2012-style folder (JPEGImages/, SegmentationClass[Aug]/, ImageSets/Segmentation/) (repeatable)")
    b.add_argument("--voc-lists", default=None,
                   help="comma-separated ImageSets/Segmentation list names to read (default: all but trainval)")
    b.add_argument("--mask-space", default=None, metavar="SPACE",
                   help="label space of the --voc masks' ids (voc21 | coco80 | coco60 | a YAML file); default: "
                        "the folder's label_space.yaml, else --label-space")
    b.add_argument("--allow-dropped-classes", action="store_true",
                   help="build even when mapping the --voc masks into --label-space merges classes present in "
                        "them into the background or voids their pixels (default: an error naming the classes)")
    b.add_argument("--folders", action="append", default=[], metavar="DIR_OR_CSV",
                   help="image-level labels: DIR/<class_name>/*.jpg, or a CSV with columns image,labels (repeatable)")
    b.add_argument("--sample", action="store_true", help="add the bundled COCO sample (raysemiseg/sample_data)")
    b.add_argument("--label-space", default="voc21", help="voc21 | coco80 | coco60 | a label-space YAML file")
    b.add_argument("--out", required=True, help="store folder (replaced if it already holds a store)")
    b.add_argument("--rows-per-file", type=int, default=64)
    b.set_defaults(func=_build)

    s = sub.add_parser("summary", help="per-split, per-class, supervision and quarantine counts of a store")
    s.add_argument("store")
    s.add_argument("--max-classes", type=int, default=None,
                   help="list at most this many classes (default: every class of the label space)")
    s.set_defaults(func=_summary)

    from raysemiseg.data import export, splits

    splits.register(sub)
    export.register(sub)
    sample.register(sub)


def _build(args: argparse.Namespace) -> int:
    from raysemiseg.data.store import Source, build_store, format_summary, open_store

    sources: list[Source] = []
    if args.sample:
        sources += [Source("coco", (str(a), str(i))) for a, i in sample.sample_sources()]
    sources += [Source("coco", (a, i)) for a, i in args.coco]
    opts: dict = {"lists": args.voc_lists.split(",")} if args.voc_lists else {}
    if args.mask_space:
        opts["mask_space"] = args.mask_space
    if args.allow_dropped_classes:
        opts["allow_dropped_classes"] = True
    sources += [Source("voc", (d,), opts) for d in args.voc]
    sources += [Source("folders", (d,)) for d in args.folders]
    r = build_store(sources, args.label_space, args.out, rows_per_file=args.rows_per_file)
    print(f"built {r.path} in {r.seconds:.1f} s: rows read {r.read} = written {r.written} + "
          f"quarantined {r.quarantined}")
    print(format_summary(open_store(r.path)))
    return 0


def _summary(args: argparse.Namespace) -> int:
    from raysemiseg.data.store import format_summary, open_store

    print(format_summary(open_store(args.store), max_classes=args.max_classes))
    return 0
