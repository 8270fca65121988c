"""One module per estimator of the gradient of eq. (1), all behind :class:`~dual_emc2.loss.estimators.base.Estimator`
(docs/DESIGN.md, section 1): InfoNCE (SimCLR / CLIP), SogCLR, the negative cache, HCL, SCL / HSCL / HUCL and EMC²
(a package of its parts); :class:`SymmetricEstimator` runs one per direction of a two-tower loss."""
from dual_emc2.loss.estimators.base import ContrastiveBatch, Estimator, EstimatorOutput
from dual_emc2.loss.estimators.emc2 import EMC2
from dual_emc2.loss.estimators.hcl import HCL
from dual_emc2.loss.estimators.infonce import InfoNCE
from dual_emc2.loss.estimators.negative_cache import NegativeCache
from dual_emc2.loss.estimators.scl import HSCL, HUCL, SCL
from dual_emc2.loss.estimators.sogclr import SogCLR
from dual_emc2.loss.estimators.symmetric import SymmetricEstimator

__all__ = ["EMC2", "HCL", "HSCL", "HUCL", "SCL", "ContrastiveBatch", "Estimator", "EstimatorOutput", "InfoNCE",
           "NegativeCache", "SogCLR", "SymmetricEstimator"]
