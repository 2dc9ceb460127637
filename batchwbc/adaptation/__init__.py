"""Local adaptation (`batchwbc adapt`): refitting the model's last layer and its
review and data-shift thresholds on a lab's own labelled cells.
"""
