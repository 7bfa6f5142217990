#!/usr/bin/env python
"""
A mutation check of the test suite: apply one plausible one-line bug at a time (the ones issue 14
found passing every test), run the test files that should catch it, restore the file, and report
which tests failed. Exits 1 if a mutation is caught by no test.

    .venv/bin/python dev/mutation_check.py

A mutation whose line no longer exists is an error naming it, before any file is touched, and
the test suite checks the list (tests/test_mutation_check.py): update it with the code.
"""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
P = "projects/MimicDet/mimicdet/"
MUTATIONS = [
    (
        "reg features flattened without the permute",
        P + "modeling/meta_arch.py",
        "reg_feats = cat(self._transpose_dense_predictions([s_reg_feats], [reg_dim])[0], 1)",
        "reg_feats = cat([x.reshape(x.shape[0], -1, reg_dim) for x in s_reg_feats], 1)",
        ["tests/modeling/test_meta_arch.py"],
    ),
    (
        "sample_mimic_boxes skipped",
        P + "modeling/meta_arch.py",
        "sample_mimic_boxes(sampled, self.mimic_per_image),",
        "sampled,",
        ["tests/modeling/test_meta_arch.py"],
    ),
    (
        "cosine over the batch axis",
        P + "modeling/mimic_loss.py",
        "F.cosine_similarity(student.float(), teacher.float(), dim=1)",
        "F.cosine_similarity(student.float(), teacher.float(), dim=0)",
        ["tests/modeling/test_mimic_loss.py"],
    ),
    (
        "T-head pooler scale of the S-head's stride",
        P + "modeling/t_head.py",
        "scales=[1.0 / 2**lvl for lvl in self.pool_levels],",
        "scales=[1.0 / 2 ** (lvl + int(staggered)) for lvl in self.pool_levels],",
        ["tests/modeling/test_t_head.py"],
    ),
    (
        "floor -> round in the level rule",
        P + "modeling/level_assignment.py",
        "offsets = torch.floor(self._log_scale(boxes)[:, 0] + 0.5)",
        "offsets = torch.round(self._log_scale(boxes)[:, 0] + 0.5)",
        [
            "tests/modeling/test_level_assignment.py",
            "tests/modeling/test_refinement.py",
            "tests/modeling/test_t_head.py",
        ],
    ),
    (
        "deploy load hook silences every missing backbone.* key",
        P + "modeling/meta_arch.py",
        'prefixes.append(f"backbone.{name}.")',
        'prefixes.append("backbone.")',
        ["tests/test_convert_to_deploy.py"],
    ),
    (
        "no per-level pre-NMS cap",
        P + "modeling/refinement.py",
        "                idx = cat(candidates)",
        "                idx = logits.topk(min(self.pre_nms_topk_train, len(logits))).indices",
        ["tests/modeling/test_refinement.py"],
    ),
    (
        "LazyConfig S-head IoU threshold changed",
        "configs/common/models/mimicdet.py",
        "        iou_threshold=0.6,",
        "        iou_threshold=0.5,",
        ["tests/test_configs.py"],
    ),
    (
        "convert_to_deploy ignores the deploy mark",
        "tools/convert_to_deploy.py",
        'deployed=checkpoint.get("deploy", False)',
        "deployed=False",
        ["tests/test_convert_to_deploy.py"],
    ),
]


def stale_mutations():
    """The mutations that cannot be applied: their line is not in their file exactly once, or a
    test file they name is missing. A check that passes them over would prove nothing."""
    stale = []
    for name, path, old, _, tests in MUTATIONS:
        if (ROOT / path).read_text().count(old) != 1:
            stale.append(f"mutation '{name}': the line {old!r} is not in {path} exactly once")
        stale += [f"mutation '{name}': no test file {t}" for t in tests if not (ROOT / t).exists()]
    return stale


def main():
    stale = stale_mutations()
    if stale:
        sys.exit("\n".join(stale) + "\nupdate MUTATIONS with the code")
    results = []
    for name, path, old, new, tests in MUTATIONS:
        f = ROOT / path
        text = f.read_text()
        f.write_text(text.replace(old, new))
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"] + tests,
                cwd=ROOT,
                capture_output=True,
                text=True,
            )
        finally:
            f.write_text(text)
        failed = [x.split(" ")[1] for x in proc.stdout.splitlines() if x.startswith("FAILED")]
        results.append((name, proc.returncode, failed))
        caught = "CAUGHT" if failed else "MISSED"
        print(f"{caught}: {name}: {len(failed)} failing: {failed}", flush=True)
    return 0 if all(f for _, _, f in results) else 1


if __name__ == "__main__":
    sys.exit(main())
