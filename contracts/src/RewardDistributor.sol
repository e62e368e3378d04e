// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {AccessControlDefaultAdminRules} from
    "@openzeppelin/contracts/access/extensions/AccessControlDefaultAdminRules.sol";
import {Pausable} from "@openzeppelin/contracts/utils/Pausable.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {MerkleProof} from "@openzeppelin/contracts/utils/cryptography/MerkleProof.sol";
import {SignatureChecker} from "@openzeppelin/contracts/utils/cryptography/SignatureChecker.sol";
import {SafeCast} from "@openzeppelin/contracts/utils/math/SafeCast.sol";

/// @notice What the distributor needs of the staking contract: stake pulled from the caller,
///         credited to `account`.
interface IStaking {
    function stakeFor(address account, uint256 amount) external;
}

/// @title Epoch reward distributor
/// @notice The settlement key posts, once per epoch, the root of an OpenZeppelin
///         StandardMerkleTree of (address account, uint256 cumulativeAmount): everything the
///         account has earned since the network began. A claim against the newest *matured*
///         root pays the difference to what the account already claimed, so a worker who skips
///         epochs claims once, with one proof.
/// @dev Epochs are numbered 1, 2, 3, ... with no gaps. A root may never lower the total of the
///      previous one and may raise it by at most `maxTotalGrowth`. A root matures `claimDelay`
///      seconds after it was posted; claims are checked against the newest matured root, so
///      posting faster than the delay never locks claims (and a bad root can be answered by
///      pausing before it matures, then posting the next epoch).
///      Also the EIP-712 verifying contract for receipts and offers (name "SogniSupernet",
///      version "3"), and of `StakeAuthorization`, the signature behind gasless auto-staking.
///      A claim that would pay nothing reverts with `NothingToClaim` (rather than succeeding
///      silently) so wallets see the mistake at gas estimation and no gas is spent on a no-op.
///      Roles: DEFAULT_ADMIN_ROLE (one holder, handed over in two steps after
///      `defaultAdminDelay()`) pauses/unpauses claims, sets the claim delay, the growth cap and
///      each season's airdrop cap and manages roles; SETTLEMENT_ROLE posts work epochs' roots
///      (meant for a separate, possibly offline key); AIRDROP_ROLE posts season airdrops.
///      Airdrops: a season's prizes are one epoch of the same numbering and the same
///      cumulative tree (its leaves are the previous root's plus each winner's prize), so one
///      claim pays work and prizes together and no earlier leaf changes. It is posted with
///      `postAirdropRoot`, once per season, its growth bounded by the season's
///      `airdropCap` (set by governance) instead of `maxTotalGrowth`.
contract RewardDistributor is AccessControlDefaultAdminRules, Pausable, EIP712 {
    using SafeERC20 for IERC20;

    bytes32 public constant SETTLEMENT_ROLE = keccak256("SETTLEMENT_ROLE");
    bytes32 public constant AIRDROP_ROLE = keccak256("AIRDROP_ROLE");
    bytes32 public constant STAKE_AUTHORIZATION_TYPEHASH =
        keccak256("StakeAuthorization(address account,uint256 cumulativeAmount,uint16 stakeBps,uint64 deadline)");
    uint16 public constant MAX_BPS = 10_000;
    /// @notice Upper bound of `claimDelay`, so a typo cannot lock claims for years.
    uint256 public constant MAX_CLAIM_DELAY = 30 days;

    IERC20 public immutable token;
    IStaking public immutable staking;

    /// @notice Seconds after posting before a root is used for claims.
    uint256 public claimDelay;
    /// @notice Most a root's `total` may exceed the previous root's.
    uint256 public maxTotalGrowth;

    /// @dev One posted epoch; `total` and `postedAt` share a slot (three slots per epoch).
    struct EpochRoot {
        bytes32 root;
        bytes32 receiptsHash;
        uint192 total;
        uint64 postedAt;
    }

    mapping(uint256 epoch => EpochRoot) private _epochs;
    uint256 public latestEpoch;
    uint256 public totalClaimed;
    mapping(address account => uint256) public claimed;
    /// @notice Most a season's airdrop epoch may add to the total (0: no airdrop allowed).
    mapping(uint256 season => uint256) public airdropCap;
    /// @notice The epoch that paid `season`'s prizes (0: not posted yet).
    mapping(uint256 season => uint256) public airdropEpochOf;
    /// @notice The season whose prizes `epoch` paid (0: a work epoch).
    mapping(uint256 epoch => uint256) public airdropSeasonOf;

    event RootPosted(uint256 indexed epoch, bytes32 root, uint256 total, bytes32 receiptsHash);
    /// @param epoch the matured epoch whose root the claim was verified against.
    event Claimed(address indexed account, uint256 indexed epoch, uint256 amount, uint256 cumulativeAmount);
    /// @notice After a `Claimed` from `claimAndStake`: how the amount was split.
    event AutoStaked(address indexed account, uint256 indexed epoch, uint256 staked, uint256 paid);
    event ClaimDelaySet(uint256 claimDelay);
    event MaxTotalGrowthSet(uint256 maxTotalGrowth);
    event AirdropCapSet(uint256 indexed season, uint256 cap);
    event AirdropPosted(uint256 indexed season, uint256 indexed epoch, uint256 amount);

    error ZeroAddress();
    error ZeroRoot();
    error RootAlreadyPosted(uint256 epoch);
    error EpochNotNext(uint256 epoch, uint256 expected);
    error TotalDecreased(uint256 total, uint256 previous);
    error GrowthCapExceeded(uint256 growth, uint256 cap);
    error Underfunded(uint256 owed, uint256 balance);
    error ClaimDelayTooLong(uint256 claimDelay, uint256 maximum);
    error NoRoot();
    error NotMatured(uint256 opensAt);
    error InvalidProof();
    error NothingToClaim(address account, uint256 cumulativeAmount, uint256 alreadyClaimed);
    error ClaimExceedsRootTotal(uint256 totalClaimedAfter, uint256 rootTotal);
    error StakeBpsTooHigh(uint16 stakeBps, uint16 maximum);
    error AuthorizationExpired(uint64 deadline);
    error InvalidStakeAuthorization(address account);
    error ZeroSeason();
    error AirdropAlreadyPosted(uint256 season, uint256 epoch);
    error AirdropCapExceeded(uint256 season, uint256 growth, uint256 cap);

    /// @param token_ the reward token (SOGNI) this contract holds and pays out.
    /// @param staking_ where `claimAndStake` stakes (through `stakeFor`).
    /// @param admin the single DEFAULT_ADMIN_ROLE holder (governance).
    /// @param settlement gets SETTLEMENT_ROLE (zero: nobody yet; the admin grants it later).
    /// @param adminTransferDelay seconds between `beginDefaultAdminTransfer` and its acceptance.
    /// @param claimDelay_ seconds a posted root waits before claims use it.
    /// @param maxTotalGrowth_ cap on how much one root's total may exceed the previous one's.
    constructor(
        IERC20 token_,
        IStaking staking_,
        address admin,
        address settlement,
        uint48 adminTransferDelay,
        uint256 claimDelay_,
        uint256 maxTotalGrowth_
    ) AccessControlDefaultAdminRules(adminTransferDelay, admin) EIP712("SogniSupernet", "3") {
        if (address(token_) == address(0) || address(staking_) == address(0)) revert ZeroAddress();
        token = token_;
        staking = staking_;
        if (settlement != address(0)) _grantRole(SETTLEMENT_ROLE, settlement);
        _setClaimDelay(claimDelay_);
        _setMaxTotalGrowth(maxTotalGrowth_);
    }

    // ----- settlement -----

    /// @notice Publish the payout root for `epoch`, which must be `latestEpoch + 1`.
    /// @param total sum of all cumulative amounts in the tree: at least the previous root's
    ///        total, at most `maxTotalGrowth` more, and covered by this contract's balance plus
    ///        what was already claimed, so every leaf is payable.
    /// @param receiptsHash content address of the epoch's published receipts file.
    function postRoot(uint256 epoch, bytes32 root, uint256 total, bytes32 receiptsHash)
        external
        onlyRole(SETTLEMENT_ROLE)
    {
        uint256 growth = _checkNext(epoch, root, total);
        if (growth > maxTotalGrowth) revert GrowthCapExceeded(growth, maxTotalGrowth);
        _record(epoch, root, total, receiptsHash);
    }

    /// @notice Publish `season`'s prize airdrop as epoch `epoch` (`latestEpoch + 1`): a root
    ///         of the same cumulative tree, adding at most `airdropCap[season]` to the total.
    ///         Once per season.
    /// @param evidenceHash content address of the published airdrop evidence (per board, per
    ///        account: the inputs to the points, the points and the prize).
    function postAirdropRoot(uint256 epoch, uint256 season, bytes32 root, uint256 total, bytes32 evidenceHash)
        external
        onlyRole(AIRDROP_ROLE)
    {
        if (season == 0) revert ZeroSeason();
        uint256 done = airdropEpochOf[season];
        if (done != 0) revert AirdropAlreadyPosted(season, done);
        uint256 growth = _checkNext(epoch, root, total);
        uint256 cap = airdropCap[season];
        if (growth > cap) revert AirdropCapExceeded(season, growth, cap);
        airdropEpochOf[season] = epoch;
        airdropSeasonOf[epoch] = season;
        _record(epoch, root, total, evidenceHash);
        emit AirdropPosted(season, epoch, growth);
    }

    /// @dev The checks every root passes (next epoch, non-zero, total not lower, funded);
    ///      returns how much it adds to the previous total.
    function _checkNext(uint256 epoch, bytes32 root, uint256 total) private view returns (uint256 growth) {
        if (root == bytes32(0)) revert ZeroRoot();
        uint256 latest = latestEpoch;
        if (epoch != 0 && epoch <= latest) revert RootAlreadyPosted(epoch);
        if (epoch != latest + 1) revert EpochNotNext(epoch, latest + 1);
        uint256 previous = _epochs[latest].total;
        if (total < previous) revert TotalDecreased(total, previous);
        growth = total - previous;
        uint256 balance = token.balanceOf(address(this));
        uint256 claimedSoFar = totalClaimed;
        uint256 owed = total > claimedSoFar ? total - claimedSoFar : 0;
        if (owed > balance) revert Underfunded(owed, balance);
    }

    function _record(uint256 epoch, bytes32 root, uint256 total, bytes32 receiptsHash) private {
        _epochs[epoch] = EpochRoot({
            root: root,
            receiptsHash: receiptsHash,
            total: SafeCast.toUint192(total),
            postedAt: uint64(block.timestamp)
        });
        latestEpoch = epoch;
        emit RootPosted(epoch, root, total, receiptsHash);
    }

    // ----- claims -----

    /// @notice Pay `account` its `cumulativeAmount` (a leaf of the newest matured root) minus
    ///         what it already claimed.
    /// @dev Anyone may submit (a relayer can pay gas); tokens always go to `account`.
    function claim(address account, uint256 cumulativeAmount, bytes32[] calldata proof)
        external
        whenNotPaused
        returns (uint256 amount)
    {
        (, amount) = _claim(account, cumulativeAmount, proof);
        token.safeTransfer(account, amount);
    }

    /// @notice Claim for `account` and stake `stakeBps`/10000 of the amount for it in `staking`;
    ///         the rest goes to `account`. Anyone may submit it (a relayer pays the gas); unless
    ///         the caller is `account`, `signature` must be `account`'s EIP-712 signature
    ///         (or ERC-1271 approval) of
    ///         `StakeAuthorization(account, cumulativeAmount, stakeBps, deadline)` under this
    ///         contract's domain. The submitter receives nothing.
    /// @return staked the part staked for `account`.
    /// @return paid the part sent to `account`.
    function claimAndStake(
        address account,
        uint256 cumulativeAmount,
        bytes32[] calldata proof,
        uint16 stakeBps,
        uint64 deadline,
        bytes calldata signature
    ) external whenNotPaused returns (uint256 staked, uint256 paid) {
        if (stakeBps > MAX_BPS) revert StakeBpsTooHigh(stakeBps, MAX_BPS);
        if (block.timestamp > deadline) revert AuthorizationExpired(deadline);
        if (msg.sender != account) {
            bytes32 digest = _hashTypedDataV4(
                keccak256(abi.encode(STAKE_AUTHORIZATION_TYPEHASH, account, cumulativeAmount, stakeBps, deadline))
            );
            if (!SignatureChecker.isValidSignatureNowCalldata(account, digest, signature)) {
                revert InvalidStakeAuthorization(account);
            }
        }
        (uint256 epoch, uint256 amount) = _claim(account, cumulativeAmount, proof);
        staked = amount * stakeBps / MAX_BPS;
        paid = amount - staked;
        emit AutoStaked(account, epoch, staked, paid);
        if (staked > 0) {
            token.forceApprove(address(staking), staked);
            staking.stakeFor(account, staked);
        }
        if (paid > 0) token.safeTransfer(account, paid);
    }

    /// @dev Verifies against the newest matured root and books the claim; pays nothing.
    function _claim(address account, uint256 cumulativeAmount, bytes32[] calldata proof)
        private
        returns (uint256 epoch, uint256 amount)
    {
        if (latestEpoch == 0) revert NoRoot();
        epoch = maturedEpoch();
        if (epoch == 0) revert NotMatured(uint256(_epochs[1].postedAt) + claimDelay);
        EpochRoot storage e = _epochs[epoch];
        bytes32 leaf = keccak256(bytes.concat(keccak256(abi.encode(account, cumulativeAmount))));
        if (!MerkleProof.verifyCalldata(proof, e.root, leaf)) revert InvalidProof();
        uint256 already = claimed[account];
        if (cumulativeAmount <= already) revert NothingToClaim(account, cumulativeAmount, already);
        amount = cumulativeAmount - already;
        // An honest tree's leaves never decrease per account, so this never fires; it bounds
        // what a root that moves amounts between accounts could pay out to its `total`.
        uint256 claimedAfter = totalClaimed + amount;
        if (claimedAfter > e.total) revert ClaimExceedsRootTotal(claimedAfter, e.total);
        claimed[account] = cumulativeAmount;
        totalClaimed = claimedAfter;
        emit Claimed(account, epoch, amount, cumulativeAmount);
    }

    // ----- admin -----

    function pause() external onlyRole(DEFAULT_ADMIN_ROLE) {
        _pause();
    }

    function unpause() external onlyRole(DEFAULT_ADMIN_ROLE) {
        _unpause();
    }

    /// @notice Change how long a posted root waits before claims use it (applies to every
    ///         root at once, including those already posted).
    function setClaimDelay(uint256 newDelay) external onlyRole(DEFAULT_ADMIN_ROLE) {
        _setClaimDelay(newDelay);
    }

    function setMaxTotalGrowth(uint256 newCap) external onlyRole(DEFAULT_ADMIN_ROLE) {
        _setMaxTotalGrowth(newCap);
    }

    /// @notice Governance's cap on what `season`'s airdrop may add to the total; fixed once
    ///         the season's airdrop is posted.
    function setAirdropCap(uint256 season, uint256 cap) external onlyRole(DEFAULT_ADMIN_ROLE) {
        if (season == 0) revert ZeroSeason();
        uint256 done = airdropEpochOf[season];
        if (done != 0) revert AirdropAlreadyPosted(season, done);
        airdropCap[season] = cap;
        emit AirdropCapSet(season, cap);
    }

    function _setClaimDelay(uint256 newDelay) private {
        if (newDelay > MAX_CLAIM_DELAY) revert ClaimDelayTooLong(newDelay, MAX_CLAIM_DELAY);
        claimDelay = newDelay;
        emit ClaimDelaySet(newDelay);
    }

    function _setMaxTotalGrowth(uint256 newCap) private {
        maxTotalGrowth = newCap;
        emit MaxTotalGrowthSet(newCap);
    }

    // ----- views -----

    /// @notice The newest epoch whose root has matured (`postedAt + claimDelay <= now`), the
    ///         one claims are checked against; 0 if none has.
    /// @dev `postedAt` never decreases with the epoch, so this is a binary search (a few
    ///      storage reads however many epochs are still maturing).
    function maturedEpoch() public view returns (uint256) {
        uint256 latest = latestEpoch;
        uint256 delay = claimDelay;
        if (latest == 0 || delay > block.timestamp) return 0;
        uint256 cutoff = block.timestamp - delay;
        if (_epochs[latest].postedAt <= cutoff) return latest;
        // invariant: lo == 0 or postedAt[lo] <= cutoff; postedAt[hi] > cutoff
        uint256 lo = 0;
        uint256 hi = latest;
        while (hi - lo > 1) {
            uint256 mid = (lo + hi) / 2;
            if (_epochs[mid].postedAt <= cutoff) lo = mid;
            else hi = mid;
        }
        return lo;
    }

    /// @notice The root claims are checked against now (zero if none has matured).
    function claimableRoot() external view returns (bytes32) {
        return _epochs[maturedEpoch()].root;
    }

    /// @notice The most recently posted root (zero before the first post); claims use
    ///         `claimableRoot()`, which is this one once it has matured.
    function latestRoot() external view returns (bytes32) {
        return _epochs[latestEpoch].root;
    }

    /// @notice Merkle root posted for `epoch` (zero if none).
    function rootOf(uint256 epoch) external view returns (bytes32) {
        return _epochs[epoch].root;
    }

    /// @notice Content hash of `epoch`'s published receipts file, kept in state (not only in
    ///         the event) so it can be read back without log history.
    function receiptsHashOf(uint256 epoch) external view returns (bytes32) {
        return _epochs[epoch].receiptsHash;
    }

    /// @notice Sum of the cumulative amounts in `epoch`'s tree (zero if none).
    function totalOf(uint256 epoch) external view returns (uint256) {
        return _epochs[epoch].total;
    }

    /// @notice Timestamp of the block that posted `epoch`'s root (zero if none).
    function postedAt(uint256 epoch) external view returns (uint256) {
        return _epochs[epoch].postedAt;
    }

    /// @notice The EIP-712 domain separator receipts and stake authorizations are signed under.
    function domainSeparator() external view returns (bytes32) {
        return _domainSeparatorV4();
    }
}
