"""What users run on a trained model: generation, imputation (and fitting a table), evaluation, images, reports.
"""
