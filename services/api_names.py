"""Names the Vision v2 API gives itself, read from its generated descriptors (never typed by hand)."""

from services.api import image_classifier_service_pb2

SERVICE_NAME: str = image_classifier_service_pb2.DESCRIPTOR.services_by_name["ImageClassifierService"].full_name
