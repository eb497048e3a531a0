//! Errors as the API answers them: `{"badRequest": {"code": 400, "message":
//! "..."}}`, and the one place that says which status each operation error
//! gets.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::daemon::ops::OpError;

/// An error in the reference's format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }
    pub fn bad_request(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, m)
    }
    pub fn not_found(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, m)
    }
    pub fn plain_not_found() -> ApiError {
        ApiError::not_found("The resource could not be found.")
    }
    pub fn malformed_url() -> ApiError {
        ApiError::bad_request("Malformed request url")
    }
    pub fn internal(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, m)
    }
}

/// The error body's name for a status code.
pub fn error_name(code: u16) -> &'static str {
    match code {
        400 => "badRequest",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "itemNotFound",
        405 => "badMethod",
        409 => "conflictingRequest",
        413 => "overLimit",
        415 => "badMediaType",
        501 => "notImplemented",
        503 => "serviceUnavailable",
        _ => "computeFault",
    }
}

/// The JSON body of an error.
pub fn error_body(code: u16, message: &str) -> Value {
    json!({ error_name(code): { "code": code, "message": message } })
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(error_body(self.status.as_u16(), &self.message)),
        )
            .into_response()
    }
}

/// The HTTP status of each operation error: every version of the API
/// answers the same.
pub fn status_of(e: &OpError) -> StatusCode {
    use OpError::*;
    match e {
        SnapshotNotFound(_)
        | VolumeNotFound(_)
        | SourceSnapshotNotFound(_)
        | MetadataItemNotFound
        | BackupNotFound(_)
        | NotFound => StatusCode::NOT_FOUND,
        TooLong { .. }
        | MetadataKeyBlank
        | ReservedMetadataKey
        | BadSize { .. }
        | NoSource
        | SmallerThanSnapshot { .. }
        | SmallerThanBackup { .. }
        | SourcesCombined
        | BackupSourceCombined
        | CloneUnsupported
        | BadMarker(_)
        | SourceSnapshotNotAvailable
        | RevertSnapshotNotAvailable
        | SnapshotNotDeletable
        | SnapshotOfOtherVolume { .. }
        | VolumeNotAvailable
        | DeviceUnreadable(_)
        | VolumeConfigured { .. }
        | DependentSnapshots(_)
        | VolumeNotDeletable
        | VolumeMounted
        | MountedForRevert
        | RevertSizeDiffers { .. }
        | DeviceShrank { .. }
        | RestoreOntoVolume
        | NoBackupRemote(_)
        | RemoteGone(_)
        | NoPreviousBackup
        | BackupSnapshotNotAvailable
        | BackupNotAvailable
        | BackupNotDeletable
        | SourceBackupNotAvailable
        | InUse { .. } => StatusCode::BAD_REQUEST,
        MetadataKeyTooLong
        | MetadataValueTooLong
        | TooManyMetadataItems
        | VolumeLimit(_)
        | VolumeTooLarge { .. }
        | NoRoom { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        Store(_) | Book(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl From<OpError> for ApiError {
    fn from(e: OpError) -> ApiError {
        let status = status_of(&e);
        let message = match &e {
            // The catalog's own error goes to the log, not to the client.
            OpError::Store(s) => {
                tracing::error!("{}", crate::util::error_chain(s));
                e.to_string()
            }
            OpError::Book(s) => {
                tracing::error!("{}", crate::util::error_chain(s));
                e.to_string()
            }
            _ => e.to_string(),
        };
        ApiError::new(status, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::claims::{Conflict, Resource};
    use crate::daemon::ops::About;

    #[test]
    fn error_bodies_use_the_reference_names() {
        assert_eq!(
            error_body(404, "x"),
            json!({"itemNotFound": {"code": 404, "message": "x"}})
        );
        assert_eq!(error_name(422), "computeFault");
        assert_eq!(error_name(500), "computeFault");
        assert_eq!(error_name(413), "overLimit");
    }

    #[test]
    fn conflicts_name_what_is_running() {
        let id = uuid::Uuid::from_u128(1);
        let e = ApiError::from(OpError::InUse {
            about: About::Snapshot,
            conflict: Conflict {
                resource: Resource::Snapshot(id),
                running: "volume v is being created from it".into(),
            },
        });
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(
            e.message,
            format!("Invalid snapshot: snapshot {id} is in use: volume v is being created from it; try again when it has finished")
        );
        let e = ApiError::from(OpError::TooManyMetadataItems);
        assert_eq!(e.status, StatusCode::PAYLOAD_TOO_LARGE);
    }
}
