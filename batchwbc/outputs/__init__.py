"""Views of computed results: workbook, gallery, CSV, labelled export, LIS messages."""
