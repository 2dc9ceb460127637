"""What a run writes and reads back: the Excel workbook, the HTML gallery, the evaluation
workbook, labelled exports and the messages to the laboratory information system (lis/).
"""
