"""The rows this repository reproduces: id → notebook, the paper's figure, and what counts as success.

The paper figures are the ones in ../shared/spec (ElasticTrain early README, CUP notebooks, DNR). Each
shipped model in ``TrainedModels/`` is named ``<row id>.etm`` and is matched to its row here.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Row:
    id: str
    notebook: str
    paper: str                      # which table
    description: str
    dataset: str
    paper_accuracy: float | None    # top-1 %, None where the paper has no figure
    paper_compression: float | None  # ElasticTrain: paper-style ratio; CUP: FLOPs reduction (FR)
    compression_kind: str           # "paper-style" (weights/nonzeros × 32/bits) or "FR" (FLOPs)


ROWS = {r.id: r for r in [
    Row("E1", "01_vgg16_50x_unstructured", "ElasticTrain", "VGG16 50× unstructured", "cifar10", 93.26, 50, "paper-style"),
    Row("E2", "02_vgg16_500x_unstructured", "ElasticTrain", "VGG16 500× unstructured", "cifar10", 91.17, 500, "paper-style"),
    Row("E2b", "03_vgg16_1000x_unstructured", "ElasticTrain", "VGG16 1000× unstructured (final README)", "cifar10", 89.51, 1000, "paper-style"),
    Row("E3", "04_vgg16_100x_kernel", "ElasticTrain", "VGG16 100× kernel", "cifar10", 92.25, 100, "paper-style"),
    Row("E4", "05_vgg16_500x_kernel", "ElasticTrain", "VGG16 500× kernel", "cifar10", 88.59, 500, "paper-style"),
    Row("P1", "06_vgg16_pattern", "ours", "VGG16 pattern-based + connectivity", "cifar10", None, None, "paper-style"),
    Row("B1", "07_vgg16_balanced_50x", "ours", "VGG16 workload-balanced 16×4 at 50×", "cifar10", None, 50, "paper-style"),
    Row("E5", "08_vgg16_8000x_quantized", "ElasticTrain", "1000× + 4-bit, 1 codebook/layer", "cifar10", 88.59, 8000, "paper-style"),
    Row("E6", "09_vgg16_16000x_quantized", "ElasticTrain", "1000× + 2-bit, 64 codebooks/layer", "cifar10", 87.93, 16000, "paper-style"),
    Row("C1", "10_mnist_mlp_cup", "CUP", "MNIST MLP 784-500-300-10 → 100/60 (manual)", "mnist", 98.63, 6.41, "FR"),
    Row("C2", "11_vgg16_cup_t090", "CUP", "VGG16 CUP t=0.90", "cifar10", 93.55, 2.93, "FR"),
    Row("C3", "12_vgg16_cup_t095", "CUP", "VGG16 CUP t=0.95", "cifar10", 92.94, 3.65, "FR"),
    Row("C4", "13_vgg16_cupss", "CUP", "VGG16 CUP-SS k=0.02", "cifar10", 93.15, 3.06, "FR"),
    Row("C5", "13_vgg16_cupss", "CUP", "VGG16 CUP-SS k=0.035", "cifar10", 93.24, 3.15, "FR"),
    Row("C6", "14_resnet56_cup", "CUP", "ResNet-56 CUP t=0.80", "cifar10", 93.27, 2.68, "FR"),
    Row("C7", "14_resnet56_cup", "CUP", "ResNet-56 CUP t=0.825", "cifar10", 92.60, 3.00, "FR"),
    Row("C8", "15_resnet56_cupss", "CUP", "ResNet-56 CUP-SS k=0.02", "cifar10", 93.36, 2.11, "FR"),
    # Adversarially trained (DNR's hybrid loss, PGD-7 at eps 8/255); the paper figure is DNR's clean
    # accuracy of its VGG16 at density 0.05. DNR prunes unstructured: for R2 it is the closest anchor.
    Row("R1", "16_vgg16_robust", "DNR", "VGG16 robust ≥20× unstructured", "cifar10", 86.74, 20, "paper-style"),
    Row("R2", "16_vgg16_robust", "DNR", "VGG16 robust ≥20× kernel (DNR is unstructured)", "cifar10", 86.74, 20,
        "paper-style"),
]}
