"""herd-eval with silence added to every clip the embedded corpus reads (eighteenth round).

    python silence_eval.py SECONDS ckpt_path=RUN/fusion/checkpoints/step002000.ckpt \
        '++data.weights={image:0,asr:1,st:0,mt:0,passkey:0}' hydra.run.dir=OUT

SECONDS > 0 appends that much silence to each clip, < 0 puts it before; the rest are
herd-eval's arguments. Measures how much a fused model's reading depends on where the
speech sits in the clip.
"""

import sys

import herd.data.digits_tasks as digits_tasks
from herd.data.audio import pad_silence
from herd.evaluate import main

seconds = float(sys.argv.pop(1))
read_audio = digits_tasks.read_audio


def read_with_silence(path):
    return pad_silence(read_audio(path), before=max(0.0, -seconds), after=max(0.0, seconds))


digits_tasks.read_audio = read_with_silence
main()
