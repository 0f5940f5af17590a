"""Teachers, students, Q/K/V capture, FLOPs and export."""

from lmdistill.models.builders import MoESettings, encoder_student, moe_student
from lmdistill.models.capture import QKV, encoder_layers, forward_qkv
from lmdistill.models.export import export_student
from lmdistill.models.flops import encoder_gflops
from lmdistill.models.student import build_student
from lmdistill.models.teacher import Teacher, build_teacher, load_teacher

__all__ = [
    "QKV",
    "MoESettings",
    "build_teacher",
    "encoder_student",
    "moe_student",
    "Teacher",
    "build_student",
    "encoder_gflops",
    "encoder_layers",
    "export_student",
    "forward_qkv",
    "load_teacher",
]
