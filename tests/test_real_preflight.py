"""train_sft.py / train_rft.py --preset llava-1.5-7b check every real input before anything is built,
loaded or written (realdata.preflight_real): a bad asset of each kind stops the script in seconds with
the flag, the file, the record and the fix named, all problems in one message, and no --out_dir left."""
import json
import os
import pickle
import shutil
import time

import numpy as np
import pytest

import realdata
import train_rft
import train_sft
from test_real_scripts import write_real_assets


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("preflight_assets")
    return d, write_real_assets(d)


def with_flag(flags: list, flag: str, value: str) -> list:
    """flags with `flag`'s value replaced (or the pair appended)."""
    if flag not in flags:
        return [*flags, flag, value]
    i = flags.index(flag)
    return [*flags[:i + 1], value, *flags[i + 2:]]


def sft_argv(d, data_flags, out):
    return ["--preset", "llava-1.5-7b", "--llava_path", str(d / "llava"), "--hmr2_ckpt", str(d / "hmr2.ckpt"),
            "--out_dir", str(out), *data_flags]


def stops(main, argv, out, *texts) -> str:
    """Run main(argv): it must stop within seconds, its message holding every text, with `out` not created."""
    t0 = time.time()
    with pytest.raises(SystemExit) as e:
        main(argv)
    msg = str(e.value.code)
    for text in texts:
        assert text in msg, f"{text!r} not in:\n{msg}"
    assert "nothing was built or written" in msg and not os.path.exists(out)
    assert time.time() - t0 < 30
    return msg


def test_good_assets_pass_the_preflight(assets, tmp_path):
    d, data_flags = assets
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(train_sft.Args).parse_args_into_dataclasses(sft_argv(d, data_flags, tmp_path / "out"))
    tasks = realdata.preflight_real(args, "sft", 0)
    assert sorted(type(ds).__name__ for ds in tasks.datasets) == ["HMR2ImageDataset", "LLaVAInstruct", "PoseScript"]
    assert not (tmp_path / "out").exists()


def test_pose_less_npz_is_named_with_the_fix(assets, tmp_path):
    d, data_flags = assets
    npz = tmp_path / "coco_2014_train.npz"  # SPIN's COCO: 2D parts, no SMPL pose
    np.savez(npz, imgname=np.array(["im0.jpg"]), center=np.array([[30.0, 40]]), scale=np.array([0.3]),
             part=np.zeros((1, 24, 3)))
    argv = sft_argv(d, with_flag(data_flags, "--image_npz", f"COCO={npz}={d / 'h36m'}"), tmp_path / "out")
    stops(train_sft.main, argv, tmp_path / "out",
          f"--image_npz COCO: COCO: {npz}: missing ['body_pose', 'has_body_pose']",
          "SPIN's COCO, MPII and Human3.6M npz carry no SMPL pose", "only mpi_inf_3dhp_train.npz has them")


def test_truncated_json_and_wrong_smpl_file_in_one_message(assets, tmp_path):
    d, data_flags = assets
    full = (d / "llava_instruct_150k.json").read_text()
    (tmp_path / "llava.json").write_text(full[:len(full) // 2])
    (tmp_path / "smplx.pkl").write_bytes(pickle.dumps({"v_template": np.zeros((10475, 3)), "f": np.zeros((4, 3))}))
    argv = sft_argv(d, with_flag(with_flag(data_flags, "--llava_instruct_json", str(tmp_path / "llava.json")),
                                 "--smpl_path", str(tmp_path / "smplx.pkl")), tmp_path / "out")
    msg = stops(train_sft.main, argv, tmp_path / "out", "2 problem(s)",
                f"--llava_instruct_json / --coco_dir: LLaVA-Instruct-150k: {tmp_path / 'llava.json'}: not valid JSON",
                "expected a list of conversation records", "download it again (llava_instruct_150k.json from",
                f"--smpl_path {tmp_path / 'smplx.pkl'}: not an SMPL model", "not an SMPL model: missing required key",
                "https://smpl.is.tue.mpg.de")
    # train_rft.py runs the same checks before writing its --out_dir
    sft = tmp_path / "sft" / "base"
    os.makedirs(sft / "model")
    (sft / "preset.json").write_text(json.dumps({"preset": "llava-1.5-7b"}))
    shutil.copy(d / "llava" / "config.json", sft / "model" / "config.json")
    rft = with_flag(data_flags, "--llava_instruct_json", str(tmp_path / "llava.json"))
    stops(train_rft.main, ["--preset", "llava-1.5-7b", "--sft_dir", str(tmp_path / "sft"), "--out_dir",
                           str(tmp_path / "rft"),
                           "--reward_retriever", str(d / "retriever"), "--smpl_path", str(tmp_path / "smplx.pkl"),
                           *rft],
          tmp_path / "rft", "2 problem(s)", "not valid JSON", "not an SMPL model")
    assert msg.count("\n  - ") == 2


def test_missing_images_name_the_record(assets, tmp_path):
    d, data_flags = assets
    records = json.loads((d / "llava_instruct_150k.json").read_text())
    records.append({**records[0], "id": "7", "image": "000000000007.jpg"})  # not in --coco_dir
    (tmp_path / "llava.json").write_text(json.dumps(records))
    empty = tmp_path / "h36m_images"
    empty.mkdir()
    flags = with_flag(with_flag(data_flags, "--llava_instruct_json", str(tmp_path / "llava.json")),
                      "--image_npz", f"H36M={d / 'h36m_train.npz'}={empty}")
    stops(train_sft.main, sft_argv(d, flags, tmp_path / "out"), tmp_path / "out",
          f"LLaVA-Instruct-150k: {d / 'coco' / '000000000007.jpg'}, record 1: image not found (1 of the 2 records "
          "checked", f"--image_npz H36M: H36M: {empty / 'im0.jpg'}, record 0: image not found (2 of the 2",
          "pass the directory that holds them")


def test_amass_sequence_without_poses_and_frames_out_of_range(assets, tmp_path):
    d, data_flags = assets
    amass = tmp_path / "amass"
    shutil.copytree(d / "amass", amass)
    np.savez(amass / "CMU" / "a_poses.npz", betas=np.zeros(16))  # a shape file, no poses
    flags = with_flag(data_flags, "--amass_dir", str(amass))
    stops(train_sft.main, sft_argv(d, flags, tmp_path / "out"), tmp_path / "out",
          f"--posescript_dir / --amass_dir: PoseScript: {amass / 'CMU' / 'a_poses.npz'}, record 0: 'poses' is missing; "
          "expected floats (T, 156)")
    np.savez(amass / "CMU" / "a_poses.npz", poses=np.zeros((2, 156)))  # 4 poses ask for frames 0..3
    stops(train_sft.main, sft_argv(d, flags, tmp_path / "out"), tmp_path / "out",
          "a_poses.npz, record 2: frame 2 out of range for 2 frames (2 pose(s))")


def test_llava_dir_without_tokenizer_and_truncated_hmr2(assets, tmp_path):
    d, data_flags = assets
    llava = tmp_path / "llava"
    llava.mkdir()
    for name in os.listdir(d / "llava"):
        if "token" not in name:
            shutil.copy(d / "llava" / name, llava / name)
    ckpt = tmp_path / "hmr2.ckpt"
    ckpt.write_bytes((d / "hmr2.ckpt").read_bytes()[:1000])
    argv = with_flag(with_flag(sft_argv(d, data_flags, tmp_path / "out"), "--llava_path", str(llava)),
                     "--hmr2_ckpt", str(ckpt))
    stops(train_sft.main, argv, tmp_path / "out", f"--llava_path {llava}: its tokenizer does not load",
          "the directory must hold LLaVA's tokenizer files", "llava-hf/llava-1.5-7b-hf",
          f"--hmr2_ckpt {ckpt}: not a readable checkpoint (not a zip archive")
