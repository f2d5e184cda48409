"""A smoke test: the tiny model on the built-in synthetic scenes, a few steps, no data to download.

    python -m beta_clip_jax.main --config=configs/tiny_test.py --workdir=/tmp/tiny
    launch/local_cluster.sh 2 --config=configs/tiny_test.py --workdir=/tmp/tiny_mp

Finishes in well under a minute on a laptop CPU. Rerunning with the same workdir resumes (once all
steps are done there is nothing left to do). The same settings as the training tests'
`tiny_config`, except that the mesh spans every device, so it also runs on several processes.
"""

from beta_clip_jax.config_defaults import base_config


def get_config():
    c = base_config("tiny")
    c.data.name = "synthetic"
    c.data.max_sentences = 2
    c.data.max_phrases = 4
    c.data.text_length = 48
    c.data.phrase_length = 12
    c.data.pack_group = 1  # packs each image alone: any mesh of the 8 devices divides the batch
    c.batch_size = 8
    c.loss.group_size = 4
    c.num_steps = 6
    c.log_every = 1
    c.checkpoint_every = 3
    c.optim.lr = 1e-3
    c.optim.final_lr = 1e-4
    return c
