"""The paper's real datasets (§4.1), read from local paths: PoseScript (+ AMASS), HMR2.0-style image
npz (3DPW, Human3.6M, COCO, MPII, ...), BEDLAM-Script, LLaVA-Instruct, PoseFix (pose editing, with
PoseScript's captions as pose-to-text: the neighbours' pose-input tasks), and `Mixture`, which mixes
them for the 7B preset (docs/REAL_RUNS.md).

Each dataset yields data.py's `Sample`s, so templates, tokenizer and `collate` serve them unchanged.
Images become one square person crop at the CLIP tower's size (`image_size`, 336 for LLaVA-1.5);
the pose ViT takes its own 3:4 centre crop of it (posevit.crop_to_aspect), which is HMR2.0's input
window. Every format problem raises `DataFormatError`, naming the dataset, the file, the record
and the schema; a missing file names where to get it.

Departures from the paper's data: SMPL+H / SMPL-X body joints are taken as SMPL's first 21,
SMPL's two hand joints at identity; BEDLAM-Script serves as image -> description pairs (the
paper does not say how it is used); LLaVA-Instruct's multi-turn conversations become
single-turn samples.

Modules: common (sources, DataFormatError, checked readers), posescript (PoseScript, the text-to-pose
frame, AMASS frames), posefix (PoseFix's editing triplets), images (HMR2.0-style npz sets and their
LSP14 evaluation joints, BEDLAM-Script, person crops), instruct (LLaVA-Instruct, Mixture), preflight
(every asset and file of a real run checked before anything is built). Their public names are
importable from the package itself, as `realdata.PoseScript`.
"""
from realdata.common import (AMASS_SOURCE, BEDLAM_SCRIPT_SOURCE, DESCRIBE_PROMPT, HMR2_DATA_SOURCE,
                             LLAVA_INSTRUCT_SOURCE, MAX_CAPTION_CHARS, POSESCRIPT_SOURCE, DataFormatError,
                             fit_captions, npz_headers)
from realdata.images import (REGRESSOR_LAYOUTS, BEDLAMScript, HMR2ImageDataset, crop_person, expand_to_aspect,
                             load_joint_regressor, lsp14_from_vertices, lsp14_mpjpe_mm, pad_to_square)
from realdata.instruct import LLaVAInstruct, Mixture
from realdata.posefix import POSEFIX_SOURCE, PoseFix
from realdata.posescript import PoseScript, posescript_normalize, smplh_to_smpl24, text_pose_frame
from realdata.preflight import RealDataFlags, check_real_assets, preflight_real, real_image_size, real_pose_input

__all__ = ["AMASS_SOURCE", "BEDLAM_SCRIPT_SOURCE", "DESCRIBE_PROMPT", "HMR2_DATA_SOURCE", "LLAVA_INSTRUCT_SOURCE",
           "MAX_CAPTION_CHARS", "POSESCRIPT_SOURCE", "DataFormatError", "fit_captions", "npz_headers", "BEDLAMScript",
           "HMR2ImageDataset", "crop_person", "expand_to_aspect", "pad_to_square", "LLaVAInstruct", "Mixture",
           "PoseScript", "posescript_normalize", "smplh_to_smpl24", "text_pose_frame", "check_real_assets",
           "preflight_real", "real_image_size", "RealDataFlags", "REGRESSOR_LAYOUTS", "load_joint_regressor",
           "lsp14_from_vertices", "lsp14_mpjpe_mm", "POSEFIX_SOURCE", "PoseFix", "real_pose_input"]
