//! The site's PACS over DICOMweb, against a real Orthanc (Debian's `orthanc` and
//! `orthanc-dicomweb`) loaded with the real DICOM files of the `pydicom` wheel.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::orthanc::{self, Orthanc, PASSWORD, USER, pydicom_files};
use kaapana_node::pacs::{DicomWeb, PacsAuth, PacsError, SeriesQuery};

fn auth() -> PacsAuth {
    PacsAuth::Basic { user: USER.into(), password: PASSWORD.into() }
}

/// Every series Orthanc holds, by its own REST API (not DICOMweb): UID → (study UID, modality,
/// instances).
fn orthanc_series(o: &Orthanc) -> BTreeMap<String, (String, String, usize)> {
    let all: serde_json::Value = serde_json::from_str(&o.get("/series?expand").unwrap()).unwrap();
    let mut out = BTreeMap::new();
    for s in all.as_array().unwrap() {
        let tags = &s["MainDicomTags"];
        let study: serde_json::Value = serde_json::from_str(
            &o.get(&format!("/studies/{}", s["ParentStudy"].as_str().unwrap())).unwrap(),
        )
        .unwrap();
        out.insert(
            tags["SeriesInstanceUID"].as_str().unwrap().to_owned(),
            (
                study["MainDicomTags"]["StudyInstanceUID"].as_str().unwrap().to_owned(),
                tags["Modality"].as_str().unwrap_or_default().to_owned(),
                s["Instances"].as_array().unwrap().len(),
            ),
        );
    }
    out
}

#[test]
fn pydicom_files_load_into_orthanc_and_qido_finds_them_by_series_study_and_modality() {
    let tmp = common::test_dir();
    let orthanc = orthanc::start(&tmp.path().join("pacs"));
    let files = pydicom_files();
    let taken = orthanc::upload_all(&orthanc, &files);
    assert!(taken >= 50, "Orthanc took only {taken} of {} pydicom files", files.len());
    let truth = orthanc_series(&orthanc);
    assert!(truth.len() >= 5, "{} series", truth.len());
    eprintln!("{} pydicom files, {taken} taken by Orthanc, {} series", files.len(), truth.len());

    let pacs = DicomWeb::new(&orthanc.dicomweb(), auth());

    // Every series, one at a time by UID, with its study, modality and instance count.
    let uids: Vec<String> = truth.keys().cloned().collect();
    let listed = pacs.series(&SeriesQuery::Series(uids.clone())).unwrap();
    assert_eq!(listed.iter().map(|s| s.series_uid.clone()).collect::<Vec<_>>(), uids);
    for s in &listed {
        let (study, modality, instances) = &truth[&s.series_uid];
        assert_eq!(&s.study_uid, study);
        assert_eq!(s.modality.as_deref().unwrap_or_default(), modality);
        assert_eq!(s.instances, *instances as u64, "series {}", s.series_uid);
    }

    // By modality: exactly the series of that modality.
    let modalities: BTreeSet<&String> =
        truth.values().map(|(_, m, _)| m).filter(|m| !m.is_empty()).collect();
    assert!(modalities.len() >= 2, "{modalities:?}");
    for m in modalities {
        let q = SeriesQuery::parse_match(&format!("Modality={m}")).unwrap();
        let found: BTreeSet<String> =
            pacs.series(&q).unwrap().into_iter().map(|s| s.series_uid).collect();
        let expected: BTreeSet<String> =
            truth.iter().filter(|(_, (_, mm, _))| mm == m).map(|(k, _)| k.clone()).collect();
        assert_eq!(found, expected, "modality {m}");
    }

    // By study: every series of the study, none of another.
    let (study, _, _) = truth.values().next().unwrap().clone();
    let found: BTreeSet<String> = pacs
        .series(&SeriesQuery::Studies(vec![study.clone()]))
        .unwrap()
        .into_iter()
        .map(|s| s.series_uid)
        .collect();
    let expected: BTreeSet<String> =
        truth.iter().filter(|(_, (st, _, _))| *st == study).map(|(k, _)| k.clone()).collect();
    assert_eq!(found, expected);

    // A UID the PACS does not hold: nothing.
    assert!(pacs.series(&SeriesQuery::Series(vec!["1.2.3.4.5.6.7".into()])).unwrap().is_empty());
}

#[test]
fn wrong_credentials_and_a_pacs_that_is_down_fail_with_what_to_check() {
    let tmp = common::test_dir();
    let orthanc = orthanc::start(&tmp.path().join("pacs"));
    let all = SeriesQuery::parse_match("Modality=CT").unwrap();

    let wrong = PacsAuth::Basic { user: USER.into(), password: "not-the-password".into() };
    match DicomWeb::new(&orthanc.dicomweb(), wrong).series(&all) {
        Err(e @ PacsError::Unauthorized { status: 401, .. }) => {
            assert!(e.to_string().contains("refused the credentials"), "{e}");
        }
        other => panic!("expected Unauthorized, got {other:?}"),
    }
    let pacs = DicomWeb::new(&orthanc.dicomweb(), auth());
    assert!(pacs.series(&all).unwrap().is_empty(), "an empty PACS holds no CT series");

    let url = orthanc.dicomweb();
    drop(orthanc);
    match DicomWeb::new(&url, auth()).series(&all) {
        Err(e @ PacsError::Unreachable { .. }) => {
            assert!(e.to_string().contains("cannot be reached"), "{e}");
        }
        other => panic!("expected Unreachable, got {other:?}"),
    }
}
