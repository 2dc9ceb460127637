"""What a run writes and reads back: the Excel workbook, the HTML gallery, the evaluation
workbook and labelled exports. A new output (HL7, FHIR) is a new module here.
"""
