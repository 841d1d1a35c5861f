"""Reports: the picture of each image, the HTML and the PDF."""
