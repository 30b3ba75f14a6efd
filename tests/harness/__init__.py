"""What the tests share: deployed-federation and netns fixtures, Flower message builders, DICOM
builders, report checks. The process harness itself is bench/localdeploy.py (benches use it too)."""
