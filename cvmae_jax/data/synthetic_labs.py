"""Catalog of the synthetic MEDS generator: labs, vitals, latent physiology, event vocabularies.

Lab codes use real MIMIC-IV ``labevents`` itemids and units (``LAB//<itemid>//<unit>``, INR has
unit ``UNK`` as in MIMIC-IV MEDS); vitals use ``chartevents`` itemids. A lab value is
``center + scale * z`` (normal) or ``center * exp(scale * z)`` (lognormal) with
``z = subj * set_point + noise * white + male * is_male + sum_k loads[k] * latent_k``;
``derived`` labs are computed from others as the analyzer would (anion gap, hematocrit, INR, pH...).
"""

from __future__ import annotations

from typing import NamedTuple

# Latent physiological states. Positive = worse (sicker, less renal function, more inflamed, ...).
LATENTS = ("sev", "renal", "infl", "hep", "heme", "card", "resp", "fluid", "glyc")


class Latent(NamedTuple):
    name: str
    tau_h: float  # Ornstein-Uhlenbeck time constant in hours
    ou_sd: float  # stationary sd of the OU part
    chronic_sd: float  # sd of the subject's chronic baseline
    frailty_rho: float  # correlation of the chronic baseline with frailty


LATENT_DYNAMICS = (
    Latent("sev", 6.0, .45, .15, .5),
    Latent("renal", 72.0, .25, .45, .4),
    Latent("infl", 24.0, .45, .3, .3),
    Latent("hep", 96.0, .25, .35, .2),
    Latent("heme", 72.0, .25, .55, .4),
    Latent("card", 12.0, .3, .35, .4),
    Latent("resp", 12.0, .45, .35, .3),
    Latent("fluid", 36.0, .55, .45, 0),
    Latent("glyc", 4.0, .5, .35, .2),
)

PANELS = ("BMP", "CBC", "LFT", "COAG", "ABG", "LACT", "CRP", "TROP")


class LabDef(NamedTuple):
    name: str
    itemid: int
    unit: str
    category: str
    panel: str
    kind: str  # "normal", "lognormal" or "derived"
    center: float
    scale: float
    lo: float
    hi: float
    decimals: int
    p: float  # probability of being resulted when its panel is drawn
    subj: float  # weight of the subject's own set point
    noise: float  # weight of white noise (measurement + fast biology)
    male: float  # shift for male subjects (z units)
    loads: tuple[tuple[str, float], ...]  # (latent, weight)
    source: str

    @property
    def code(self) -> str:
        return f"LAB//{self.itemid}//{self.unit}"

    @property
    def description(self) -> str:
        """The readable name codes.parquet gives the code: "Creatinine [mg/dL]" (no unit for
        ``UNK``)."""
        return self.name if self.unit == "UNK" else f"{self.name} [{self.unit}]"


def _lab(name, itemid, unit, category, panel, kind, center=0.0, scale=0.0, lo=0.0, hi=0.0,
         decimals=0, *, p=1.0, subj=0.0, noise=0.0, male=0.0, source="hosp labevents", **loads):
    return LabDef(name, itemid, unit, category, panel, kind, center, scale, lo, hi, decimals, p,
                  subj, noise, male, tuple(loads.items()), source)


_CHEM, _HEME, _GAS = "Blood, Chemistry", "Blood, Hematology", "Blood, Blood Gas"
_N, _L, _D = "normal", "lognormal", "derived"

LAB_CATALOG = (
    # Basic metabolic panel.
    _lab("Sodium", 50983, "mEq/L", _CHEM, "BMP", _N, 139, 3.6, 105, 175, 0,
         subj=.45, noise=.25, fluid=.75, glyc=-.15),
    _lab("Potassium", 50971, "mEq/L", _CHEM, "BMP", _N, 4.05, .55, 1.8, 9.5, 1,
         subj=.3, noise=.45, renal=.55, sev=.2),
    _lab("Chloride", 50902, "mEq/L", _CHEM, "BMP", _N, 102, 5.5, 70, 140, 0,
         subj=.4, noise=.25, fluid=.8, renal=.1),
    _lab("Bicarbonate", 50882, "mEq/L", _CHEM, "BMP", _N, 26, 4.0, 5, 50, 0,
         subj=.3, noise=.35, renal=-.4, sev=-.6, resp=.3),
    _lab("Anion Gap", 50868, "mEq/L", _CHEM, "BMP", _D, lo=1, hi=50),
    _lab("Urea Nitrogen", 51006, "mg/dL", _CHEM, "BMP", _L, 15, .5, 2, 250, 0,
         subj=.3, noise=.25, renal=.8, heme=.25, sev=.2),
    _lab("Creatinine", 50912, "mg/dL", _CHEM, "BMP", _L, .85, .48, .1, 20, 1,
         subj=.25, noise=.2, male=.45, renal=.9),
    _lab("Glucose", 50931, "mg/dL", _CHEM, "BMP", _L, 105, .33, 20, 1500, 0,
         subj=.15, noise=.55, glyc=.85, sev=.25),
    _lab("Calcium, Total", 50893, "mg/dL", _CHEM, "BMP", _N, 8.9, .7, 4.5, 15, 1, p=.85,
         subj=.5, noise=.3, hep=-.25, sev=-.3, renal=-.15),
    _lab("Magnesium", 50960, "mg/dL", _CHEM, "BMP", _N, 2.0, .33, .6, 5, 1, p=.85,
         subj=.4, noise=.45, renal=.4),
    _lab("Phosphate", 50970, "mg/dL", _CHEM, "BMP", _L, 3.3, .3, .5, 20, 1, p=.8,
         subj=.3, noise=.55, renal=.7, sev=.2),
    # Complete blood count.
    _lab("Hemoglobin", 51222, "g/dL", _HEME, "CBC", _N, 11.9, 1.9, 3, 22, 1,
         subj=.35, noise=.12, male=.6, heme=-.85, infl=-.1),
    _lab("Hematocrit", 51221, "%", _HEME, "CBC", _D, lo=8, hi=70, decimals=1),
    _lab("Platelet Count", 51265, "K/uL", _HEME, "CBC", _L, 220, .55, 5, 1500, 0,
         subj=.5, noise=.3, hep=-.45, infl=.2, sev=-.35),
    _lab("White Blood Cells", 51301, "K/uL", _HEME, "CBC", _L, 7.5, .5, .1, 200, 1,
         subj=.3, noise=.45, infl=.8, sev=.2),
    _lab("MCV", 51250, "fL", _HEME, "CBC", _N, 90, 5.5, 55, 130, 0,
         subj=.9, noise=.15, hep=.25, heme=.15),
    _lab("MCHC", 51249, "g/dL", _HEME, "CBC", _N, 33.2, 1.2, 25, 40, 1,
         subj=.75, noise=.35, heme=-.25),
    _lab("MCH", 51248, "pg", _HEME, "CBC", _D, lo=15, hi=50, decimals=1),
    _lab("Red Blood Cells", 51279, "m/uL", _HEME, "CBC", _D, lo=1, hi=8, decimals=2),
    _lab("RDW", 51277, "%", _HEME, "CBC", _L, 14.0, .14, 10, 35, 1,
         subj=.65, noise=.2, heme=.55, infl=.15),
    # Liver function tests.
    _lab("Alanine Aminotransferase (ALT)", 50861, "IU/L", _CHEM, "LFT", _L, 24, .85, 3, 10000, 0,
         subj=.3, noise=.45, hep=.8, sev=.25),
    _lab("Asparate Aminotransferase (AST)", 50878, "IU/L", _CHEM, "LFT", _L, 28, .8, 5, 15000, 0,
         subj=.25, noise=.45, hep=.75, sev=.35),
    _lab("Alkaline Phosphatase", 50863, "IU/L", _CHEM, "LFT", _L, 85, .55, 15, 3000, 0,
         subj=.55, noise=.25, hep=.6),
    _lab("Bilirubin, Total", 50885, "mg/dL", _CHEM, "LFT", _L, .5, .8, .1, 50, 1,
         subj=.3, noise=.35, hep=.85, heme=.15),
    _lab("Albumin", 50862, "g/dL", _CHEM, "LFT", _N, 3.9, .6, 1.0, 5.5, 1,
         subj=.45, noise=.3, hep=-.45, infl=-.45),
    # Coagulation.
    _lab("PT", 51274, "sec", _HEME, "COAG", _L, 12.4, .2, 9, 150, 1,
         subj=.25, noise=.2, hep=.8, sev=.35),
    _lab("INR(PT)", 51237, "UNK", _HEME, "COAG", _D, lo=.8, hi=15, decimals=1),
    _lab("PTT", 51275, "sec", _HEME, "COAG", _L, 30, .35, 18, 150, 1, p=.9,
         subj=.3, noise=.6, hep=.3, sev=.3),
    # Arterial blood gas (pH and base excess are derived from pCO2 and bicarbonate).
    _lab("pCO2", 50818, "mm Hg", _GAS, "ABG", _L, 40, .16, 15, 130, 0,
         subj=.2, noise=.45, resp=.8, sev=-.25),
    _lab("pO2", 50821, "mm Hg", _GAS, "ABG", _L, 105, .45, 20, 600, 0,
         subj=.1, noise=.85, resp=-.55),
    _lab("pH", 50820, "units", _GAS, "ABG", _D, lo=6.8, hi=7.8, decimals=2),
    _lab("Base Excess", 50802, "mEq/L", _GAS, "ABG", _D, lo=-30, hi=25, decimals=0),
    _lab("Lactate", 50813, "mmol/L", _GAS, "LACT", _L, 1.1, 1.05, .3, 30, 1,
         subj=.1, noise=.7, sev=.7, hep=.15),
    # Inflammation and myocardial injury.
    _lab("C-Reactive Protein", 50889, "mg/L", _CHEM, "CRP", _L, 8, .85, .1, 500, 1,
         subj=.2, noise=.55, infl=.8),
    _lab("Troponin T", 51003, "ng/mL", _CHEM, "TROP", _L, .015, .8, .01, 25, 2,
         subj=.2, noise=.5, card=.8, renal=.3, sev=.2),
)

_ICU = "ICU chartevents"
VITAL_CATALOG = (
    _lab("Heart Rate", 220045, "bpm", "Routine Vital Signs", "VITALS", _N, 82, 16, 30, 200, 0,
         subj=.35, noise=.5, sev=.5, card=.3, infl=.25, source=_ICU),
    _lab("Respiratory Rate", 220210, "insp/min", "Respiratory", "VITALS", _N, 18, 4, 5, 50, 0,
         p=.98, subj=.2, noise=.6, resp=.5, sev=.4, source=_ICU),
    _lab("O2 saturation pulseoxymetry", 220277, "%", "Respiratory", "VITALS", _N, 97.5, 2, 60,
         100, 0, p=.97, subj=.2, noise=.6, resp=-.7, source=_ICU),
    _lab("Temperature Fahrenheit", 223761, "°F", "Routine Vital Signs", "VITALS", _N, 98.4, .8, 93,
         106, 1, p=.35, subj=.2, noise=.6, infl=.6, source=_ICU),
)


class Insult(NamedTuple):
    """Reason for an admission: its share, acute latent profile, panel boosts, ICU units, ICD-10."""
    name: str
    prob: float
    acute: tuple[tuple[str, float], ...]
    boosts: tuple[tuple[str, float], ...]
    icu_units: tuple[str, str]
    icd: str


_MICU = "Medical Intensive Care Unit (MICU)"
_MSICU = "Medical/Surgical Intensive Care Unit (MICU/SICU)"
_CVICU = "Cardiac Vascular Intensive Care Unit (CVICU)"
INSULTS = (
    Insult("sepsis", .2, (("sev", 1.0), ("renal", .5), ("infl", 1.6), ("hep", .25), ("heme", .2),
                          ("card", .2), ("resp", .35), ("fluid", -.3), ("glyc", .25)),
           (("LACT", .35), ("CRP", .45), ("LFT", .15)), (_MICU, _MSICU), "A419"),
    Insult("cardiac", .15, (("sev", .6), ("renal", .3), ("infl", .2), ("card", 1.8), ("resp", .3),
                            ("fluid", .2)),
           (("TROP", .65), ("COAG", .2)),
           ("Coronary Care Unit (CCU)", _CVICU), "I214"),
    Insult("kidney", .1, (("sev", .4), ("renal", 1.6), ("infl", .2), ("heme", .2), ("fluid", .5)),
           (), (_MICU, _MSICU), "N179"),
    Insult("gi_bleed", .1, (("sev", .5), ("renal", .3), ("infl", .1), ("hep", .3), ("heme", 1.6)),
           (("COAG", .3),), (_MICU, _MSICU), "K922"),
    Insult("liver", .07, (("sev", .5), ("renal", .3), ("infl", .3), ("hep", 1.6), ("heme", .5),
                          ("fluid", -.5)),
           (("LFT", .5), ("COAG", .4)), (_MICU, _MSICU), "K7031"),
    Insult("respiratory", .13, (("sev", .6), ("infl", .5), ("card", .2), ("resp", 1.6),
                                ("glyc", .15)),
           (("ABG", .35), ("LACT", .1)), (_MICU, _MSICU), "J9601"),
    Insult("metabolic", .05, (("sev", .7), ("renal", .5), ("infl", .15), ("resp", -.4),
                              ("fluid", .5), ("glyc", 1.8)),
           (("ABG", .3), ("LACT", .2)), (_MICU, _MSICU), "E1110"),
    Insult("elective", .2, (("sev", .15), ("renal", .1), ("infl", .35), ("heme", .3), ("glyc", .1)),
           (), ("Surgical Intensive Care Unit (SICU)", _CVICU), "M1711"),
)

# Ordering policy: P(panel drawn) by draw kind (rows: outpatient visit, admission draw, morning
# draw, extra ICU draw), plus, for inpatient draws, the insult's boosts, VOLATILE * (severity - .8)
# (sicker subjects get more gases, lactates, CRPs and troponins) and ICU_BOOST while in the ICU.
ORDER_PROBS = (
    (.9, .7, .2, .08, 0, 0, .04, 0),
    (1, .97, .45, .45, .1, .25, .15, .25),
    (.97, .92, .15, .2, .02, .05, .07, .03),
    (.2, .1, 0, .08, .85, .55, .03, .08),
)
VOLATILE = (0, 0, 0, 0, .3, .3, .1, .1)
ICU_BOOST = (0, 0, 0, .25, .2, .2, 0, 0)

EMERGENT_ADMISSIONS = (("EW EMER.//EMERGENCY ROOM", .55), ("URGENT//TRANSFER FROM HOSPITAL", .15),
                       ("OBSERVATION ADMIT//EMERGENCY ROOM", .12),
                       ("EU OBSERVATION//EMERGENCY ROOM", .08),
                       ("DIRECT EMER.//PHYSICIAN REFERRAL", .1))
ELECTIVE_ADMISSIONS = (("ELECTIVE//PHYSICIAN REFERRAL", .5),
                       ("SURGICAL SAME DAY ADMISSION//PHYSICIAN REFERRAL", .5))
# (location, probability for a fit subject, probability for a frail one); DIED is separate.
DISCHARGES = (("HOME", .55, .15), ("HOME HEALTH CARE", .25, .3),
              ("SKILLED NURSING FACILITY", .05, .3), ("REHAB", .05, .1),
              ("CHRONIC/LONG TERM ACUTE CARE", .01, .06), ("AGAINST ADVICE", .03, .01),
              ("UNK", .06, .08))

DIAGNOSES = {
    "A419": "Sepsis, unspecified organism",
    "I214": "Non-ST elevation (NSTEMI) myocardial infarction",
    "N179": "Acute kidney failure, unspecified",
    "K922": "Gastrointestinal hemorrhage, unspecified",
    "K7031": "Alcoholic cirrhosis of liver with ascites",
    "J9601": "Acute respiratory failure with hypoxia",
    "E1110": "Type 2 diabetes mellitus with ketoacidosis without coma",
    "M1711": "Unilateral primary osteoarthritis, right knee",
    "N183": "Chronic kidney disease, stage 3 (moderate)",
    "E119": "Type 2 diabetes mellitus without complications",
    "K7460": "Unspecified cirrhosis of liver",
    "J449": "Chronic obstructive pulmonary disease, unspecified",
    "I10": "Essential (primary) hypertension",
    "D649": "Anemia, unspecified",
    "I2510": "Atherosclerotic heart disease of native coronary artery without angina pectoris",
}
# Chronic diagnoses coded at every discharge of a subject with the condition.
CHRONIC_DIAGNOSES = (("ckd", "N183"), ("diabetes", "E119"), ("cirrhosis", "K7460"),
                     ("copd", "J449"), ("hypertension", "I10"), ("anemia", "D649"),
                     ("cad", "I2510"))
