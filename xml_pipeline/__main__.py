from xml_pipeline.cli import main

main(prog_name="xml-pipeline")
