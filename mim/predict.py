"""Classify image files with a trained classifier.

    python -m mim.predict --checkpoint=runs/demo --images=photos/ [--topk=5] [--out=preds.csv]
    python -m mim.predict --checkpoint=mae_finetuned_vit_base --images=cat.jpg

``--checkpoint``: a mim classification run (workdir or step folder; the class names are
the train split's folder names it recorded), an official checkpoint name
(``python -m mim.weights list``), or official weights with ``--from`` and ``--config``.
One row per image: its top-k class names and probabilities, printed, or written as
``.csv`` / ``.json``; any image size (the run's evaluation transform); unreadable files
are reported and skipped. Images in folders named after classes also give the top-1
accuracy. The work is in :mod:`mim.inference`.
"""
from __future__ import annotations

import sys

from absl import app, flags

FLAGS = flags.FLAGS


def _define_flags():
    flags.DEFINE_string("checkpoint", None, "mim run / checkpoint, official name, or weights with --from")
    flags.DEFINE_string("images", None, "an image file or a folder (searched recursively)")
    flags.DEFINE_integer("topk", 5, "class names per image")
    flags.DEFINE_string("out", "", "write the rows to F.csv or F.json (default: print them)")
    flags.DEFINE_string("from", "mim", "format of --checkpoint (mim, or an official format)")
    flags.DEFINE_string("config", "", "experiment FILE.py[:variant] (official weights)")
    flags.DEFINE_integer("batch_size", 64, "images per forward")
    flags.DEFINE_string("device", "auto", "auto | cpu | cuda | npu")


def main(argv):
    from mim import inference
    if len(argv) > 1:
        raise inference.PredictError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.out and not FLAGS.out.endswith((".csv", ".json")):
        raise inference.PredictError(f"--out={FLAGS.out}: must end in .csv or .json")
    r = inference.predict(FLAGS.checkpoint, FLAGS.images, FLAGS.topk, FLAGS["from"].value,
                          FLAGS.config, FLAGS.batch_size, FLAGS.device)
    if FLAGS.out:
        inference.write(r, FLAGS.out)
    else:
        for row in r["rows"]:
            print(row["path"] + "  " + "  ".join(f"{n} {p:.3f}" for n, p in zip(row["labels"], row["probs"])))
    for path, why in r["skipped"]:
        print(f"skipped {path}: {why}", file=sys.stderr)
    acc = (f"; top-1 {r['accuracy']:.3f}% over {r['labelled']} images in class folders"
           if r["accuracy"] is not None else "")
    where = f", wrote {FLAGS.out}" if FLAGS.out else ""
    print(f"{len(r['rows'])} images classified, {len(r['skipped'])} skipped{acc}{where}")


if __name__ == "__main__":
    _define_flags()
    flags.mark_flags_as_required(["checkpoint", "images"])
    from mim import cli
    app.run(cli.guard("mim.predict", main))
