"""How the multiple-choice benchmarks group their subjects, for the category rows of the results.

Only the overall score is in the README table; categories help reading a result. Subjects missing here (a renamed
file, a custom subset) count in the overall score and their own row, just in no category.
"""

from __future__ import annotations

# MMLU: the four categories the original evaluate_mmlu.py printed, with its names and its grouping (close to the
# MMLU paper's, but with anatomy in stem).
MMLU_CATEGORIES: dict[str, list[str]] = {
    "stem": [
        "abstract_algebra", "anatomy", "astronomy", "college_biology", "college_chemistry", "college_computer_science",
        "college_mathematics", "college_physics", "computer_security", "conceptual_physics", "electrical_engineering",
        "elementary_mathematics", "high_school_biology", "high_school_chemistry", "high_school_computer_science",
        "high_school_mathematics", "high_school_physics", "high_school_statistics", "machine_learning",
    ],
    "Humanities": [
        "formal_logic", "high_school_european_history", "high_school_us_history", "high_school_world_history",
        "international_law", "jurisprudence", "logical_fallacies", "moral_disputes", "moral_scenarios", "philosophy",
        "prehistory", "professional_law", "world_religions",
    ],
    "other": [
        "business_ethics", "college_medicine", "human_aging", "management", "marketing", "medical_genetics",
        "miscellaneous", "nutrition", "professional_accounting", "professional_medicine", "virology", "global_facts",
        "clinical_knowledge",
    ],
    "social": [
        "econometrics", "high_school_geography", "high_school_government_and_politics", "high_school_macroeconomics",
        "high_school_microeconomics", "high_school_psychology", "human_sexuality", "professional_psychology",
        "public_relations", "security_studies", "sociology", "us_foreign_policy",
    ],
}

# C-Eval: the four groups of its subject_mapping.json, and its "Hard" subset (Huang et al., 2023).
CEVAL_CATEGORIES: dict[str, list[str]] = {
    "STEM": [
        "computer_network", "operating_system", "computer_architecture", "college_programming", "college_physics",
        "college_chemistry", "advanced_mathematics", "probability_and_statistics", "discrete_mathematics",
        "electrical_engineer", "metrology_engineer", "high_school_mathematics", "high_school_physics",
        "high_school_chemistry", "high_school_biology", "middle_school_mathematics", "middle_school_biology",
        "middle_school_physics", "middle_school_chemistry", "veterinary_medicine",
    ],
    "Social Science": [
        "college_economics", "business_administration", "marxism", "mao_zedong_thought", "education_science",
        "teacher_qualification", "high_school_politics", "high_school_geography", "middle_school_politics",
        "middle_school_geography",
    ],
    "Humanities": [
        "modern_chinese_history", "ideological_and_moral_cultivation", "logic", "law",
        "chinese_language_and_literature", "art_studies", "professional_tour_guide", "legal_professional",
        "high_school_chinese", "high_school_history", "middle_school_history",
    ],
    "Other": [
        "civil_servant", "sports_science", "plant_protection", "basic_medicine", "clinical_medicine",
        "urban_and_rural_planner", "accountant", "fire_engineer", "environmental_impact_assessment_engineer",
        "tax_accountant", "physician",
    ],
    "Hard": [
        "advanced_mathematics", "discrete_mathematics", "probability_and_statistics", "college_chemistry",
        "college_physics", "high_school_mathematics", "high_school_chemistry", "high_school_physics",
    ],
}

# CMMLU: the five groups of its repository (Li et al., 2023); "China specific" overlaps the other four.
CMMLU_CATEGORIES: dict[str, list[str]] = {
    "STEM": [
        "anatomy", "astronomy", "college_actuarial_science", "college_engineering_hydrology", "college_mathematics",
        "college_medical_statistics", "computer_science", "conceptual_physics", "electrical_engineering",
        "elementary_mathematics", "genetics", "high_school_biology", "high_school_chemistry",
        "high_school_mathematics", "high_school_physics", "machine_learning", "virology",
    ],
    "Humanities": [
        "arts", "chinese_history", "chinese_literature", "college_law", "global_facts", "international_law",
        "jurisprudence", "logical", "marxist_theory", "philosophy", "professional_law", "world_history",
        "world_religions",
    ],
    "Social Science": [
        "ancient_chinese", "business_ethics", "chinese_civil_service_exam", "chinese_food_culture",
        "chinese_foreign_policy", "chinese_teacher_qualification", "college_education", "economics", "education",
        "elementary_chinese", "ethnology", "high_school_geography", "high_school_politics", "journalism", "management",
        "marketing", "modern_chinese", "professional_accounting", "professional_psychology", "public_relations",
        "security_study", "sociology",
    ],
    "Other": [
        "agronomy", "chinese_driving_rule", "clinical_knowledge", "college_medicine", "computer_security",
        "construction_project_management", "elementary_commonsense", "elementary_information_and_technology",
        "food_science", "human_sexuality", "legal_and_moral_basis", "nutrition", "professional_medicine",
        "sports_science", "traditional_chinese_medicine",
    ],
    "China specific": [
        "ancient_chinese", "chinese_civil_service_exam", "chinese_driving_rule", "chinese_food_culture",
        "chinese_foreign_policy", "chinese_history", "chinese_literature", "chinese_teacher_qualification",
        "construction_project_management", "elementary_chinese", "elementary_commonsense", "ethnology",
        "high_school_politics", "modern_chinese", "traditional_chinese_medicine",
    ],
}
